//! Running a firmware updater on a real machine: the ordered argument vector as a child
//! process (no shell, stdin closed), every output line echoed to the console, the end of
//! the output kept for the report, and the whole process group killed and reaped when the
//! order's time limit passes. What the run means is [`crate::firmware`]'s.

use std::cell::RefCell;
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};

use crate::firmware::{OutputLines, OutputTail, UpdaterEnd, UpdaterRun, UPDATER_LINES_ECHOED_MAX};

/// How long output is still read once the updater exited: a helper it left behind may
/// hold the pipes open, and the run must end anyway.
const OUTPUT_DRAIN: Duration = Duration::from_secs(2);
/// Bound on reaping the killed updater (SIGKILL is not refused; this only guards against
/// a process stuck in the kernel).
const REAP_TIMEOUT: Duration = Duration::from_secs(10);
const READ_CHUNK_BYTES: usize = 4096;

/// Runs `argv` for at most `timeout`; `say` prints one console line (the host adds its
/// prefix). Never panics and never outlives `timeout` by more than the drain and reap
/// bounds.
pub async fn run(argv: &[String], timeout: Duration, say: &dyn Fn(&str)) -> UpdaterRun {
    let not_run = |why: String| UpdaterRun {
        ended: UpdaterEnd::NotRun(why),
        output_tail: String::new(),
    };
    let Some((program, args)) = argv.split_first() else {
        return not_run("empty argument vector".into());
    };
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so a timeout kills what a script started too.
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(error) => return not_run(format!("{program}: {error}")),
    };
    let output = Output {
        tail: RefCell::new(OutputTail::default()),
        echoed: RefCell::new(0),
        say,
    };
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let ran = tokio::time::timeout(timeout, async {
        let pumps = async {
            tokio::join!(output.pump(stdout), output.pump(stderr));
        };
        tokio::pin!(pumps);
        let mut drained = false;
        let status = tokio::select! {
            biased;
            status = child.wait() => status,
            () = &mut pumps => {
                drained = true;
                child.wait().await
            }
        };
        if !drained {
            let _ = tokio::time::timeout(OUTPUT_DRAIN, pumps).await;
        }
        status
    })
    .await;
    let ended = match ran {
        Ok(Ok(status)) => ended(status),
        Ok(Err(error)) => UpdaterEnd::NotRun(format!("waiting for {program}: {error}")),
        Err(_) => {
            kill_group(&mut child).await;
            UpdaterEnd::TimedOut(timeout)
        }
    };
    UpdaterRun {
        ended,
        output_tail: output.tail.into_inner().into_text(),
    }
}

fn ended(status: ExitStatus) -> UpdaterEnd {
    match (status.code(), status.signal()) {
        (Some(code), _) => UpdaterEnd::Exited(code),
        (None, Some(signal)) => UpdaterEnd::Signalled(signal),
        (None, None) => UpdaterEnd::NotRun(format!("ended without an exit code: {status}")),
    }
}

/// SIGKILL to the updater's process group, then the updater reaped.
async fn kill_group(child: &mut tokio::process::Child) {
    if let Some(pid) = child.id().and_then(|pid| libc::pid_t::try_from(pid).ok()) {
        // SAFETY: plain kill(2); the group is the child's own (process_group(0)), and the
        // child is not reaped yet, so its pid cannot have been reused.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
    }
    let _ = child.start_kill();
    let _ = tokio::time::timeout(REAP_TIMEOUT, child.wait()).await;
}

/// Where both output streams go: the console (up to a number of lines) and the tail.
struct Output<'a> {
    tail: RefCell<OutputTail>,
    echoed: RefCell<usize>,
    say: &'a dyn Fn(&str),
}

impl Output<'_> {
    /// Reads `stream` to its end, line by line. A read error ends it like EOF: what was
    /// read is kept, and the exit status says how the run ended.
    async fn pump(&self, stream: Option<impl AsyncRead + Unpin>) {
        let Some(mut stream) = stream else {
            return;
        };
        let mut lines = OutputLines::default();
        let mut chunk = vec![0u8; READ_CHUNK_BYTES];
        loop {
            let read = match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(read) => read,
            };
            for line in lines.push(&chunk[..read]) {
                self.line(&line);
            }
        }
        if let Some(line) = lines.finish() {
            self.line(&line);
        }
    }

    fn line(&self, line: &str) {
        self.tail.borrow_mut().push_line(line);
        let mut echoed = self.echoed.borrow_mut();
        *echoed += 1;
        if *echoed <= UPDATER_LINES_ECHOED_MAX {
            (self.say)(&format!("firmware updater: {line}"));
        } else if *echoed == UPDATER_LINES_ECHOED_MAX + 1 {
            (self.say)(&format!(
                "firmware updater: more than {UPDATER_LINES_ECHOED_MAX} lines; the rest is not echoed"
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn sh(script: &str) -> Vec<String> {
        vec!["/bin/sh".into(), "-c".into(), script.into()]
    }

    async fn run_collecting(argv: &[String], timeout: Duration) -> (UpdaterRun, Vec<String>) {
        let lines = Mutex::new(Vec::new());
        let say = |line: &str| lines.lock().unwrap().push(line.to_string());
        let run = run(argv, timeout, &say).await;
        (run, lines.into_inner().unwrap())
    }

    #[tokio::test]
    async fn output_of_both_streams_is_echoed_and_kept() {
        let (run, lines) = run_collecting(
            &sh("echo one; echo two >&2; printf 'no newline'; exit 4"),
            Duration::from_secs(30),
        )
        .await;
        assert_eq!(run.ended, UpdaterEnd::Exited(4));
        let mut sorted = lines.clone();
        sorted.sort();
        assert_eq!(
            sorted,
            [
                "firmware updater: no newline",
                "firmware updater: one",
                "firmware updater: two"
            ]
        );
        for line in ["one\n", "two\n", "no newline\n"] {
            assert!(run.output_tail.contains(line), "{:?}", run.output_tail);
        }
    }

    #[tokio::test]
    async fn a_program_that_cannot_start_is_not_run() {
        let (run, lines) =
            run_collecting(&["/nonexistent/flash".to_string()], Duration::from_secs(5)).await;
        assert!(
            matches!(&run.ended, UpdaterEnd::NotRun(why) if why.starts_with("/nonexistent/flash: ")),
            "{run:?}"
        );
        assert!(lines.is_empty());
        let (run, _) = run_collecting(&[], Duration::from_secs(5)).await;
        assert_eq!(
            run.ended,
            UpdaterEnd::NotRun("empty argument vector".into())
        );
    }

    #[tokio::test]
    async fn a_signal_ends_the_run_as_signalled() {
        let (run, _) = run_collecting(&sh("kill -TERM $$"), Duration::from_secs(30)).await;
        assert_eq!(run.ended, UpdaterEnd::Signalled(libc::SIGTERM));
    }

    #[tokio::test]
    async fn echoing_stops_after_its_line_limit_but_the_tail_goes_on() {
        let (run, lines) = run_collecting(
            &sh(&format!(
                "i=0; while [ $i -lt {} ]; do echo line $i; i=$((i+1)); done",
                UPDATER_LINES_ECHOED_MAX + 10
            )),
            Duration::from_secs(60),
        )
        .await;
        assert_eq!(run.ended, UpdaterEnd::Exited(0));
        assert_eq!(lines.len(), UPDATER_LINES_ECHOED_MAX + 1);
        assert!(lines.last().unwrap().contains("the rest is not echoed"));
        assert!(run
            .output_tail
            .ends_with(&format!("line {}\n", UPDATER_LINES_ECHOED_MAX + 9)));
    }

    #[tokio::test]
    async fn a_helper_holding_the_pipes_does_not_keep_a_finished_run_going() {
        // The script exits at once; the background sleep keeps stdout open far longer
        // than the time limit. The run ends with the script's code, not a timeout.
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("helper.pid");
        let (run, _) = run_collecting(
            &sh(&format!(
                "echo started; sleep 600 & echo $! > {}; exit 0",
                pid_file.display()
            )),
            Duration::from_secs(300),
        )
        .await;
        let helper: libc::pid_t = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // SAFETY: plain kill(2) of the helper this test started.
        unsafe {
            libc::kill(helper, libc::SIGKILL);
        }
        assert_eq!(run.ended, UpdaterEnd::Exited(0));
        assert!(run.output_tail.contains("started"));
    }
}
