//! The subset of iPXE script Bearman writes and the stage-1 agent reads back.
//!
//! The daemon renders scripts with [`render_boot`], [`render_exit`]; the agent turns a
//! target script into a kexec call with [`parse`]. Both ends share this module so a script
//! the daemon can write is, by construction, one the agent can read.

/// A parsed boot script: at most one kernel with its arguments, any number of initrds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BootScript {
    pub kernel: Option<KernelLine>,
    pub initrds: Vec<String>,
    /// True when the script ends with `exit`: the node must not boot anything from us.
    pub exit: bool,
    /// Text of `echo` lines, for the console.
    pub messages: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelLine {
    pub url: String,
    pub args: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScriptError {
    #[error("not an iPXE script: first line must be #!ipxe")]
    MissingHeader,
    #[error("line {line}: {command} needs a URL")]
    MissingUrl { line: usize, command: String },
    #[error("line {line}: unsupported command {command:?}")]
    Unsupported { line: usize, command: String },
    #[error("script has more than one kernel line (line {line})")]
    DuplicateKernel { line: usize },
    #[error("script neither boots a kernel nor exits")]
    NothingToBoot,
}

/// Renders a script that boots `kernel_url` with `args` and the given initrds.
pub fn render_boot(comment: &str, kernel_url: &str, args: &str, initrd_urls: &[String]) -> String {
    let mut script = String::from("#!ipxe\n");
    for line in comment.lines() {
        script.push_str("# ");
        script.push_str(line);
        script.push('\n');
    }
    script.push_str("kernel ");
    script.push_str(kernel_url);
    if !args.is_empty() {
        script.push(' ');
        script.push_str(args);
    }
    script.push('\n');
    for url in initrd_urls {
        script.push_str("initrd ");
        script.push_str(url);
        script.push('\n');
    }
    script.push_str("boot\n");
    script
}

/// Renders a script that tells iPXE to give up on network boot (e.g. a retired node).
pub fn render_exit(message: &str) -> String {
    format!("#!ipxe\necho {}\nexit\n", message.replace('\n', " "))
}

/// Parses a script produced by [`render_boot`] or [`render_exit`] (and hand-written ones
/// in the same subset: comments, `echo`, `kernel`/`chain`, `initrd`, `boot`, `exit`).
pub fn parse(text: &str) -> Result<BootScript, ScriptError> {
    let mut lines = text.lines().enumerate();
    match lines.next() {
        Some((_, first)) if first.trim_end() == "#!ipxe" => {}
        _ => return Err(ScriptError::MissingHeader),
    }
    let mut script = BootScript::default();
    for (index, raw) in lines {
        let line_no = index + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (command, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let rest = rest.trim();
        match command {
            "kernel" | "chain" | "imgexec" => {
                if script.kernel.is_some() {
                    return Err(ScriptError::DuplicateKernel { line: line_no });
                }
                let rest = skip_options(rest);
                let (url, args) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
                if url.is_empty() {
                    return Err(ScriptError::MissingUrl {
                        line: line_no,
                        command: command.to_string(),
                    });
                }
                script.kernel = Some(KernelLine {
                    url: url.to_string(),
                    args: args.trim().to_string(),
                });
            }
            "initrd" | "module" => {
                let url = skip_options(rest).split_whitespace().next().unwrap_or("");
                if url.is_empty() {
                    return Err(ScriptError::MissingUrl {
                        line: line_no,
                        command: command.to_string(),
                    });
                }
                script.initrds.push(url.to_string());
            }
            "echo" => script.messages.push(rest.to_string()),
            "exit" => {
                script.exit = true;
                break;
            }
            "boot" => break,
            "dhcp" | "sleep" | "imgfree" => {}
            other => {
                return Err(ScriptError::Unsupported {
                    line: line_no,
                    command: other.to_string(),
                })
            }
        }
    }
    if script.kernel.is_none() && !script.exit {
        return Err(ScriptError::NothingToBoot);
    }
    Ok(script)
}

/// Skips iPXE image options such as `--name foo` or `--autofree` before the URL.
fn skip_options(mut rest: &str) -> &str {
    while let Some(stripped) = rest.strip_prefix("--") {
        let (option, tail) = stripped
            .split_once(char::is_whitespace)
            .unwrap_or((stripped, ""));
        rest = tail.trim_start();
        // Options taking a value are written `--name value` or `--name=value`.
        if matches!(option, "name" | "timeout") {
            rest = rest
                .split_once(char::is_whitespace)
                .map(|(_, tail)| tail.trim_start())
                .unwrap_or("");
        }
    }
    rest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendered_boot_script_parses_back() {
        let text = render_boot(
            "stage 2",
            "http://h/k",
            "console=ttyS0 ip=dhcp",
            &["http://h/i1".into(), "http://h/i2".into()],
        );
        let parsed = parse(&text).unwrap();
        assert_eq!(
            parsed.kernel,
            Some(KernelLine {
                url: "http://h/k".into(),
                args: "console=ttyS0 ip=dhcp".into()
            })
        );
        assert_eq!(parsed.initrds, vec!["http://h/i1", "http://h/i2"]);
        assert!(!parsed.exit);
    }

    #[test]
    fn exit_script_parses_as_exit() {
        let parsed = parse(&render_exit("retired")).unwrap();
        assert!(parsed.exit);
        assert_eq!(parsed.messages, vec!["retired"]);
    }

    #[test]
    fn options_before_urls_are_skipped() {
        let parsed = parse(
            "#!ipxe\nkernel --name vmlinuz http://h/k a=b\ninitrd --name=x http://h/i\nboot\n",
        );
        // `--name=x` carries its value inline, so the URL follows directly.
        let parsed = parsed.unwrap();
        assert_eq!(parsed.kernel.unwrap().url, "http://h/k");
        assert_eq!(parsed.initrds, vec!["http://h/i"]);
    }

    #[test]
    fn bad_scripts_are_refused_with_reasons() {
        assert_eq!(parse("kernel x"), Err(ScriptError::MissingHeader));
        assert_eq!(parse("#!ipxe\nboot\n"), Err(ScriptError::NothingToBoot));
        assert!(matches!(
            parse("#!ipxe\nkernel\n"),
            Err(ScriptError::MissingUrl { line: 2, .. })
        ));
        assert!(matches!(
            parse("#!ipxe\nshell\n"),
            Err(ScriptError::Unsupported { .. })
        ));
        assert!(matches!(
            parse("#!ipxe\nkernel a\nkernel b\n"),
            Err(ScriptError::DuplicateKernel { line: 3 })
        ));
    }
}
