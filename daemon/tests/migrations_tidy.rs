//! Tidy check: the SQLite and PostgreSQL migrations describe one schema. Both run the same
//! queries (sqlx `Any`), so a table or column that exists in one flavour only is a query
//! that fails on the other backend. Types may differ (INTEGER / BIGINT, AUTOINCREMENT /
//! BIGSERIAL); names may not.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Table name → column names, as the migrations leave them after running in order.
type Schema = BTreeMap<String, BTreeSet<String>>;

#[test]
fn sqlite_and_postgres_migrations_define_the_same_tables_and_columns() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
    let (sqlite_files, sqlite) = schema_of(&root.join("sqlite"));
    let (postgres_files, postgres) = schema_of(&root.join("postgres"));
    assert_eq!(
        sqlite_files, postgres_files,
        "each migration exists in both flavours, under the same name"
    );
    assert!(sqlite.contains_key("nodes"), "the parser found the tables");
    assert_eq!(
        sqlite, postgres,
        "sqlite (left) and postgres (right) migrations differ"
    );
}

#[test]
fn the_parser_reads_tables_added_columns_and_constraints() {
    let mut schema = Schema::new();
    apply(
        "-- a comment; with a semicolon\n\
         CREATE TABLE a (\n  id INTEGER PRIMARY KEY, -- the key\n  name TEXT NOT NULL,\n  \
         PRIMARY KEY (id), UNIQUE (name, id),\n  FOREIGN KEY (name) REFERENCES b (x)\n);\n\
         CREATE INDEX a_name ON a (name);\n\
         ALTER TABLE a ADD COLUMN extra BIGINT;\n\
         CREATE TABLE IF NOT EXISTS \"c\" (v NUMERIC(10, 2));\n\
         DROP TABLE c;",
        &mut schema,
        "inline",
    );
    let expected: Schema = [(
        "a".to_string(),
        ["id", "name", "extra"].map(String::from).into(),
    )]
    .into();
    assert_eq!(schema, expected);
}

/// The migration file names of `dir` and the schema they build, applied in name order
/// (sqlx's order: the numeric prefix).
fn schema_of(dir: &Path) -> (Vec<String>, Schema) {
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".sql"))
        .collect();
    files.sort();
    let mut schema = Schema::new();
    for file in &files {
        let text = std::fs::read_to_string(dir.join(file)).unwrap();
        apply(&text, &mut schema, &format!("{}/{file}", dir.display()));
    }
    (files, schema)
}

/// Applies the statements of one migration to `schema`. A statement that could change
/// tables or columns in a way this parser does not know fails the test loudly rather
/// than being skipped.
fn apply(text: &str, schema: &mut Schema, origin: &str) {
    let without_comments: String = text
        .lines()
        .map(|line| line.split("--").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    for statement in without_comments.split(';') {
        let words: Vec<&str> = statement.split_whitespace().collect();
        let upper: Vec<String> = words.iter().map(|w| w.to_ascii_uppercase()).collect();
        let upper: Vec<&str> = upper.iter().map(String::as_str).collect();
        match upper.as_slice() {
            [] => {}
            ["CREATE", "TABLE", ..] => {
                let (name, columns) = create_table(statement, origin);
                let previous = schema.insert(name.clone(), columns);
                assert!(previous.is_none(), "{origin}: table {name} created twice");
            }
            ["CREATE", "INDEX" | "UNIQUE", ..] => {}
            ["DROP", "INDEX", ..] => {}
            ["DROP", "TABLE", rest @ ..] => {
                let name = identifier(rest.last().expect("table name"));
                assert!(
                    schema.remove(&name).is_some(),
                    "{origin}: dropping unknown table {name}"
                );
            }
            ["ALTER", "TABLE", _, "ADD", "COLUMN", ..] => {
                let table = identifier(words[2]);
                let column = identifier(words[5]);
                let columns = schema
                    .get_mut(&table)
                    .unwrap_or_else(|| panic!("{origin}: altering unknown table {table}"));
                assert!(
                    columns.insert(column.clone()),
                    "{origin}: column {table}.{column} added twice"
                );
            }
            _ => panic!(
                "{origin}: statement this check does not understand (teach it): {}",
                statement.trim()
            ),
        }
    }
}

/// Table name and column names of a `CREATE TABLE name (…)` statement.
fn create_table(statement: &str, origin: &str) -> (String, BTreeSet<String>) {
    let open = statement
        .find('(')
        .unwrap_or_else(|| panic!("{origin}: CREATE TABLE without columns"));
    let close = statement
        .rfind(')')
        .unwrap_or_else(|| panic!("{origin}: CREATE TABLE not closed"));
    let head: Vec<&str> = statement[..open].split_whitespace().collect();
    let name = identifier(head.last().expect("table name"));
    let mut columns = BTreeSet::new();
    for item in split_top_level(&statement[open + 1..close]) {
        let first = item.split_whitespace().next().unwrap_or("");
        let keyword = first.to_ascii_uppercase();
        if item.trim().is_empty()
            || ["PRIMARY", "UNIQUE", "FOREIGN", "CHECK", "CONSTRAINT"].contains(&keyword.as_str())
        {
            continue;
        }
        assert!(
            columns.insert(identifier(first)),
            "{origin}: column {name}.{first} defined twice"
        );
    }
    (name, columns)
}

/// Splits a column list at the commas outside parentheses.
fn split_top_level(text: &str) -> Vec<&str> {
    let mut items = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (index, character) in text.char_indices() {
        match character {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                items.push(&text[start..index]);
                start = index + 1;
            }
            _ => {}
        }
    }
    items.push(&text[start..]);
    items
}

fn identifier(word: &str) -> String {
    word.trim_matches('"').to_ascii_lowercase()
}
