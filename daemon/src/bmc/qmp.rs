//! The QMP BMC driver: power control of a QEMU virtual machine through its QMP unix socket,
//! so Bearman can drive a VM (smoke boots, labs) exactly like a server.
//!
//! QEMU must be started with `-no-shutdown` (and a `-qmp unix:PATH,server=on,wait=off`
//! socket): without it a guest that powers itself off makes the QEMU process exit, and a
//! machine whose "BMC" disappears with it cannot be powered on again. With it the VM stops
//! in the `shutdown` state, which this driver reads as Off.
//!
//! Power mapping:
//! - `power_state`: `query-status`; `running` (and `suspended`, see [`power_state_of`]) is
//!   On, every other run state (`paused`, `shutdown`, `prelaunch`, errors, …) is Off.
//! - `power_off` (hard, STONITH): `stop` then `system_reset`; the VM stays paused, which is
//!   Off, and its next `cont` boots from scratch as a server's power-on would.
//! - `power_off_soft` (clean, ACPI): `system_powerdown`, the power button.
//! - `power_on`: nothing when already running (as a real BMC's "power on" of a powered
//!   server), else `system_reset` then `cont`.
//! - `set_next_boot_pxe`: accepted and does nothing: the VMs Bearman drives are diskless
//!   and boot from the network every time (their only boot device is the NIC).
//! - `inject_nmi`: `inject-nmi` to a running VM (an NMI on every vCPU); refused when the
//!   VM is not running, as a real BMC refuses a diagnostic interrupt to a powered-off host.
//!
//! Every call opens its own connection (QEMU serves one QMP client at a time), reads the
//! greeting, negotiates capabilities and runs its commands, all within one timeout.
//! Architecture invariant: the socket is opened through `runtime::system::connect_unix`;
//! this module parses and sequences QMP and knows no other I/O.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

use super::{Bmc, BmcError, PowerState};

/// Default bound on one driver call, connect and every command in it included.
pub const QMP_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);
/// Longest QMP line accepted; QEMU's replies to the commands used here are a few hundred bytes.
const LINE_BYTES_MAX: u64 = 64 * 1024;
/// Asynchronous events skipped while waiting for one reply before giving up.
const EVENTS_PER_REPLY_MAX: usize = 256;

/// Why one QMP exchange failed; the text becomes the `detail` of a `BmcError::Failed`.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("receive: {0}")]
    Receive(std::io::Error),
    #[error("QEMU closed the connection")]
    Closed,
    #[error("QEMU closed the connection mid-reply")]
    ClosedMidReply,
    #[error("reply longer than {LINE_BYTES_MAX} bytes")]
    LineTooLong,
    #[error("not QMP JSON ({reason}): {line}")]
    NotJson { reason: String, line: String },
    #[error("not a QMP object: {line}")]
    NotObject { line: String },
    #[error("unexpected QMP message: {line}")]
    UnexpectedMessage { line: String },
    #[error("expected the QMP greeting, got {got}")]
    NoGreeting { got: String },
    #[error("query-status: no status in {reply}")]
    NoStatus { reply: String },
    #[error("the VM is not running (status {status}): it is powered off")]
    NotRunning { status: String },
    #[error("{command}: {reason}")]
    Encode { command: String, reason: String },
    #[error("{command}: send: {error}")]
    Send {
        command: String,
        error: std::io::Error,
    },
    #[error("{command}: QEMU refused ({class}): {desc}")]
    Refused {
        command: String,
        class: String,
        desc: String,
    },
    #[error("{command}: unexpected second greeting")]
    SecondGreeting { command: String },
    #[error("{command}: no reply among {EVENTS_PER_REPLY_MAX} events")]
    NoReply { command: String },
    /// Reading the reply to `command` failed.
    #[error("{command}: {error}")]
    Reply {
        command: String,
        error: Box<QmpError>,
    },
}

/// A QEMU VM's power, driven over its QMP socket.
pub struct QmpBmc {
    socket: PathBuf,
    /// How errors name this BMC: `qmp <socket>`.
    bmc: String,
    timeout: Duration,
}

impl QmpBmc {
    /// A driver for the VM whose QMP socket is at `socket`; every call is bounded by `timeout`.
    pub fn new(socket: impl Into<PathBuf>, timeout: Duration) -> QmpBmc {
        let socket = socket.into();
        QmpBmc {
            bmc: format!("qmp {}", socket.display()),
            socket,
            timeout,
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Runs one operation within the timeout and names its failure.
    async fn run<T>(
        &self,
        operation: &'static str,
        work: impl std::future::Future<Output = Result<T, QmpError>>,
    ) -> Result<T, BmcError> {
        let error = match tokio::time::timeout(self.timeout, work).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(error)) => BmcError::Failed {
                bmc: self.bmc.clone(),
                operation,
                detail: error.to_string(),
            },
            Err(_elapsed) => BmcError::Timeout {
                bmc: self.bmc.clone(),
                operation,
            },
        };
        tracing::debug!(error = %error, "qmp: call failed");
        Err(error)
    }

    /// Connects and negotiates capabilities: a session ready for commands.
    async fn session(&self) -> Result<Session<impl AsyncRead + AsyncWrite + Unpin>, QmpError> {
        let stream = crate::runtime::system::connect_unix(&self.socket)
            .await
            .map_err(QmpError::Connect)?;
        Session::open(stream).await
    }
}

#[async_trait]
impl Bmc for QmpBmc {
    async fn power_state(&self) -> Result<PowerState, BmcError> {
        self.run("power_state", async {
            let mut session = self.session().await?;
            let status = session.execute("query-status").await?;
            power_state_of(&status)
        })
        .await
    }

    async fn power_on(&self) -> Result<(), BmcError> {
        self.run("power_on", async {
            let mut session = self.session().await?;
            let status = session.execute("query-status").await?;
            if power_state_of(&status)? == PowerState::On {
                return Ok(());
            }
            // A VM in `shutdown` refuses `cont` until reset; a reset also makes every
            // power-on a cold boot, as on a server.
            session.execute("system_reset").await?;
            session.execute("cont").await?;
            Ok(())
        })
        .await
    }

    async fn power_off(&self) -> Result<(), BmcError> {
        self.run("power_off", async {
            let mut session = self.session().await?;
            session.execute("stop").await?;
            // Drop the guest's state now, so nothing it was doing survives the "power cut".
            session.execute("system_reset").await?;
            Ok(())
        })
        .await
    }

    async fn power_off_soft(&self) -> Result<(), BmcError> {
        self.run("power_off_soft", async {
            let mut session = self.session().await?;
            // The ACPI power button: a guest that handles it shuts down (and, with
            // -no-shutdown, the VM stops in `shutdown`); one that does not ignores it.
            session.execute("system_powerdown").await?;
            Ok(())
        })
        .await
    }

    async fn set_next_boot_pxe(&self) -> Result<(), BmcError> {
        // Diskless VMs boot from the network every time: nothing to set.
        Ok(())
    }

    fn supports_nmi(&self) -> bool {
        true
    }

    async fn inject_nmi(&self) -> Result<(), BmcError> {
        self.run("inject_nmi", async {
            let mut session = self.session().await?;
            let status = session.execute("query-status").await?;
            // QEMU accepts inject-nmi on a paused or shut-down VM too, where no operating
            // system can panic: the drill would believe it caused a fault that never
            // happened. Refuse, as a BMC does a diagnostic interrupt to a powered-off host.
            if power_state_of(&status)? != PowerState::On {
                return Err(QmpError::NotRunning {
                    status: status
                        .get("status")
                        .and_then(Value::as_str)
                        .unwrap_or("unknown")
                        .to_string(),
                });
            }
            session.execute("inject-nmi").await?;
            Ok(())
        })
        .await
    }
}

/// The power state a `query-status` return means.
///
/// `suspended` (guest ACPI S3) counts as On: the guest can wake itself up without us, so
/// fencing must not believe it is off.
pub fn power_state_of(status: &Value) -> Result<PowerState, QmpError> {
    let state = status
        .get("status")
        .and_then(Value::as_str)
        .ok_or_else(|| QmpError::NoStatus {
            reply: truncate(&status.to_string()),
        })?;
    Ok(match state {
        "running" | "suspended" => PowerState::On,
        _ => PowerState::Off,
    })
}

/// One line QEMU sent, classified.
#[derive(Debug, PartialEq)]
pub enum Message {
    Greeting,
    Return(Value),
    Error { class: String, desc: String },
    Event(String),
}

/// Classifies one QMP line (without its newline).
pub fn parse_message(line: &[u8]) -> Result<Message, QmpError> {
    let value: Value = serde_json::from_slice(line).map_err(|error| QmpError::NotJson {
        reason: error.to_string(),
        line: truncate_bytes(line),
    })?;
    let object = value.as_object().ok_or_else(|| QmpError::NotObject {
        line: truncate_bytes(line),
    })?;
    if let Some(returned) = object.get("return") {
        return Ok(Message::Return(returned.clone()));
    }
    if let Some(error) = object.get("error") {
        let text = |key: &str| {
            error
                .get(key)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        return Ok(Message::Error {
            class: text("class"),
            desc: text("desc"),
        });
    }
    if let Some(event) = object.get("event") {
        return Ok(Message::Event(event.as_str().unwrap_or("").to_string()));
    }
    if object.contains_key("QMP") {
        return Ok(Message::Greeting);
    }
    Err(QmpError::UnexpectedMessage {
        line: truncate_bytes(line),
    })
}

/// A negotiated QMP connection.
struct Session<S> {
    stream: BufReader<S>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    async fn open(stream: S) -> Result<Session<S>, QmpError> {
        let mut session = Session {
            stream: BufReader::new(stream),
        };
        match session.read_message().await? {
            Message::Greeting => {}
            other => {
                return Err(QmpError::NoGreeting {
                    got: format!("{other:?}"),
                })
            }
        }
        session.execute("qmp_capabilities").await?;
        Ok(session)
    }

    /// Sends `command` and returns its `return` value; a QMP error names the command and
    /// carries QEMU's `desc`.
    async fn execute(&mut self, command: &str) -> Result<Value, QmpError> {
        let mut line =
            serde_json::to_vec(&serde_json::json!({ "execute": command })).map_err(|error| {
                QmpError::Encode {
                    command: command.to_string(),
                    reason: error.to_string(),
                }
            })?;
        line.push(b'\n');
        let send_error = |error| QmpError::Send {
            command: command.to_string(),
            error,
        };
        let stream = self.stream.get_mut();
        stream.write_all(&line).await.map_err(send_error)?;
        stream.flush().await.map_err(send_error)?;
        for _ in 0..EVENTS_PER_REPLY_MAX {
            match self.read_message().await.map_err(|error| QmpError::Reply {
                command: command.to_string(),
                error: Box::new(error),
            })? {
                Message::Return(value) => return Ok(value),
                Message::Error { class, desc } => {
                    return Err(QmpError::Refused {
                        command: command.to_string(),
                        class,
                        desc,
                    })
                }
                Message::Event(_) => continue,
                Message::Greeting => {
                    return Err(QmpError::SecondGreeting {
                        command: command.to_string(),
                    })
                }
            }
        }
        Err(QmpError::NoReply {
            command: command.to_string(),
        })
    }

    /// Reads one line (at most `LINE_BYTES_MAX`) and classifies it.
    async fn read_message(&mut self) -> Result<Message, QmpError> {
        let mut line = Vec::new();
        let read = (&mut self.stream)
            .take(LINE_BYTES_MAX)
            .read_until(b'\n', &mut line)
            .await
            .map_err(QmpError::Receive)?;
        if read == 0 {
            return Err(QmpError::Closed);
        }
        if line.last() != Some(&b'\n') {
            return Err(if read as u64 >= LINE_BYTES_MAX {
                QmpError::LineTooLong
            } else {
                QmpError::ClosedMidReply
            });
        }
        let text = line.trim_ascii();
        parse_message(text)
    }
}

fn truncate(text: &str) -> String {
    text.chars().take(200).collect()
}

fn truncate_bytes(bytes: &[u8]) -> String {
    truncate(&String::from_utf8_lossy(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn run_states_map_to_power() {
        let check = |status: &str, expect: PowerState| {
            let value =
                json!({ "running": status == "running", "singlestep": false, "status": status });
            assert_eq!(power_state_of(&value).unwrap(), expect, "{status}");
        };
        check("running", PowerState::On);
        check("suspended", PowerState::On);
        for off in [
            "paused",
            "shutdown",
            "prelaunch",
            "internal-error",
            "io-error",
            "guest-panicked",
        ] {
            check(off, PowerState::Off);
        }
        assert!(power_state_of(&json!({}))
            .unwrap_err()
            .to_string()
            .contains("no status"));
    }

    #[test]
    fn messages_are_classified() {
        let greeting = br#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}}, "capabilities": ["oob"]}}"#;
        assert_eq!(parse_message(greeting).unwrap(), Message::Greeting);
        assert_eq!(
            parse_message(br#"{"return": {}}"#).unwrap(),
            Message::Return(json!({}))
        );
        assert_eq!(
            parse_message(br#"{"error": {"class": "GenericError", "desc": "Resetting the Virtual Machine is required"}}"#).unwrap(),
            Message::Error {
                class: "GenericError".into(),
                desc: "Resetting the Virtual Machine is required".into()
            }
        );
        assert_eq!(
            parse_message(br#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "RESET", "data": {}}"#).unwrap(),
            Message::Event("RESET".into())
        );
        assert!(parse_message(b"garbage")
            .unwrap_err()
            .to_string()
            .contains("not QMP JSON"));
        assert!(parse_message(b"[1]")
            .unwrap_err()
            .to_string()
            .contains("not a QMP object"));
        assert!(parse_message(b"{}")
            .unwrap_err()
            .to_string()
            .contains("unexpected QMP message"));
    }

    #[tokio::test]
    async fn a_qmp_error_names_the_command_and_desc() {
        let (client, mut server) = tokio::io::duplex(4096);
        let peer = async move {
            server
                .write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n")
                .await
                .unwrap();
            let mut reader = BufReader::new(&mut server);
            let mut line = String::new();
            reader.read_line(&mut line).await.unwrap();
            assert!(line.contains("qmp_capabilities"), "{line}");
            reader
                .get_mut()
                .write_all(b"{\"return\": {}}\r\n")
                .await
                .unwrap();
            line.clear();
            reader.read_line(&mut line).await.unwrap();
            assert!(line.contains("\"cont\""), "{line}");
            reader
                .get_mut()
                .write_all(b"{\"event\": \"STOP\"}\r\n{\"error\": {\"class\": \"GenericError\", \"desc\": \"Resetting the Virtual Machine is required\"}}\r\n")
                .await
                .unwrap();
        };
        let client = async move {
            let mut session = Session::open(client).await.unwrap();
            session.execute("cont").await.unwrap_err().to_string()
        };
        let ((), error) = tokio::join!(peer, client);
        assert_eq!(
            error,
            "cont: QEMU refused (GenericError): Resetting the Virtual Machine is required"
        );
    }
}
