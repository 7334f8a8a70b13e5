-- Chaos drills (`core::drill`). Keep in step with ../postgres/0007_drills.sql.
-- The board: one row (`id` = 1) holding the drill running now and the kill switch
-- (`core::drill::DrillBoard`). `generation` grows with every write; a write presents
-- the one it read, so two replicas never start two drills at once.
CREATE TABLE drill_board (
    id INTEGER PRIMARY KEY NOT NULL,
    generation INTEGER NOT NULL,
    doc TEXT NOT NULL,
    updated_at_ms INTEGER NOT NULL
);
-- Finished drills with everything their report is made of (`core::drill::Drill`),
-- filed in the transaction of the board write that ends them.
CREATE TABLE drills (
    id INTEGER PRIMARY KEY NOT NULL,
    name TEXT NOT NULL,
    started_at_ms INTEGER NOT NULL,
    doc TEXT NOT NULL
);
