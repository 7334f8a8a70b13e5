//! The Redfish driver against sushy-tools' emulator (its fake driver: in-memory systems),
//! started by each test on 127.0.0.1 with a port the kernel picks; and against a loopback
//! server for what an emulator will not do on demand (never answer, answer garbage, insist
//! on an ETag).
//!
//! The emulator comes from the virtualenv `scripts/install-deps.sh` makes (`.venv-sushy/`
//! in the repo, or `BEARMAN_SUSHY_VENV`). Without it these tests fail, saying so: they are
//! never skipped. Session tests run it through `fixtures/redfish/sushy_sessions.py`, which
//! adds the SessionService that sushy-tools lacks.

#[path = "support/sushy.rs"]
mod sushy;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bearman::bmc::redfish::{RedfishAuth, RedfishBmc, RedfishConfig};
use bearman::bmc::{Bmc, BmcError, PowerState};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use sushy::*;

async fn wait_for_power(bmc: &RedfishBmc, want: PowerState) {
    let deadline = Instant::now() + POWER_BOUND;
    loop {
        let state = bmc.power_state().await.expect("power_state");
        if state == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "power state still {state:?} after {POWER_BOUND:?}; want {want:?}"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

fn system_path(uuid: &str) -> String {
    format!("/redfish/v1/Systems/{uuid}")
}

#[tokio::test]
async fn discovers_the_first_system_with_basic_auth() {
    let emulator = Emulator::start(Options::default());
    let bmc = emulator.bmc(emulator.config());
    assert_eq!(bmc.discover().await.unwrap(), system_path(NODE_A));
    assert_eq!(bmc.power_state().await.unwrap(), PowerState::Off);
}

#[tokio::test]
async fn configured_system_id_selects_the_system_and_a_missing_one_is_named() {
    let emulator = Emulator::start(Options::default());
    let mut config = emulator.config();
    config.system_id = Some(NODE_B.into());
    let bmc = emulator.bmc(config.clone());
    assert_eq!(bmc.discover().await.unwrap(), system_path(NODE_B));

    config.system_id = Some("no-such-node".into());
    let error = emulator.bmc(config).power_state().await.unwrap_err();
    let text = error.to_string();
    assert!(
        matches!(
            &error,
            BmcError::Failed {
                operation: "power_state",
                ..
            }
        ),
        "{error:?}"
    );
    assert!(
        text.contains("/redfish/v1/Systems/no-such-node")
            && text.contains("404")
            && text.contains("Fake system no-such-node was not found"),
        "{text}"
    );
}

#[tokio::test]
async fn power_off_reads_back_off() {
    let emulator = Emulator::start(Options {
        power: "On",
        ..Options::default()
    });
    let bmc = emulator.bmc(emulator.config());
    assert_eq!(bmc.power_state().await.unwrap(), PowerState::On);
    bmc.power_off().await.unwrap();
    wait_for_power(&bmc, PowerState::Off).await;
    // Fencing twice is harmless.
    bmc.power_off().await.unwrap();
    assert_eq!(bmc.power_state().await.unwrap(), PowerState::Off);
}

#[tokio::test]
async fn power_on_reads_back_on() {
    let emulator = Emulator::start(Options::default());
    let bmc = emulator.bmc(emulator.config());
    assert_eq!(bmc.power_state().await.unwrap(), PowerState::Off);
    bmc.power_on().await.unwrap();
    wait_for_power(&bmc, PowerState::On).await;
    bmc.power_on().await.unwrap();
    assert_eq!(bmc.power_state().await.unwrap(), PowerState::On);
}

#[tokio::test]
async fn graceful_shutdown_and_restart_are_accepted() {
    let emulator = Emulator::start(Options {
        power: "On",
        ..Options::default()
    });
    let bmc = emulator.bmc(emulator.config());
    bmc.power_restart().await.unwrap();
    wait_for_power(&bmc, PowerState::On).await;
    bmc.power_off_graceful().await.unwrap();
    wait_for_power(&bmc, PowerState::Off).await;
}

/// sushy-tools 2.2.0 advertises `Nmi` among the system's reset types, so the driver posts
/// it; its fake driver has no NMI (`set_power_state` raises NotSupportedError: http 501).
/// So this proves the request reached the BMC as `ResetType: Nmi` (the emulator's answer
/// names it) and that its refusal is a clear error — not an NMI's effect.
#[tokio::test]
async fn nmi_is_posted_and_an_emulator_without_it_refuses_clearly() {
    let emulator = Emulator::start(Options {
        power: "On",
        ..Options::default()
    });
    let bmc = emulator.bmc(emulator.config());
    assert!(bmc.supports_nmi());
    let error = bmc.inject_nmi().await.unwrap_err();
    let text = error.to_string();
    assert!(
        matches!(
            &error,
            BmcError::Failed {
                operation: "inject_nmi",
                ..
            }
        ),
        "{error:?}"
    );
    assert!(
        text.contains(&format!(
            "POST {}/Actions/ComputerSystem.Reset: http 501",
            system_path(NODE_A)
        )) && text.contains("Power state Nmi is not supported"),
        "{text}"
    );
    assert_eq!(bmc.power_state().await.unwrap(), PowerState::On);
}

#[tokio::test]
async fn pxe_once_is_set_and_read_back() {
    let emulator = Emulator::start(Options::default());
    let bmc = emulator.bmc(emulator.config());
    assert_eq!(
        bmc.boot_override().await.unwrap().target.as_deref(),
        Some("Hdd")
    );
    bmc.set_next_boot_pxe().await.unwrap();
    // sushy's fake driver records the target but always reports `Continuous` for
    // BootSourceOverrideEnabled; that the driver asks for `Once` is checked against the
    // loopback server in `pxe_patch_asks_for_once_and_retries_with_the_etag`.
    assert_eq!(
        bmc.boot_override().await.unwrap().target.as_deref(),
        Some("Pxe")
    );
}

#[tokio::test]
async fn wrong_password_is_a_clear_401_without_the_password() {
    let emulator = Emulator::start(Options {
        sessions: true,
        ..Options::default()
    });
    for auth in [RedfishAuth::Basic, RedfishAuth::Session] {
        let mut config = emulator.config();
        config.password = WRONG_PASSWORD.into();
        config.auth = auth;
        let error = emulator.bmc(config).power_state().await.unwrap_err();
        let text = error.to_string();
        assert!(
            matches!(
                &error,
                BmcError::Failed {
                    operation: "power_state",
                    ..
                }
            ),
            "{auth:?}: {error:?}"
        );
        assert!(
            text.contains(&emulator.address()) && text.contains("401 Unauthorized"),
            "{auth:?}: {text}"
        );
        assert!(
            !text.contains(WRONG_PASSWORD) && !format!("{error:?}").contains(WRONG_PASSWORD),
            "{auth:?}: {text}"
        );
        if auth == RedfishAuth::Session {
            assert!(text.contains("session login refused"), "{text}");
        }
    }
}

#[tokio::test]
async fn session_auth_works_and_close_logs_out() {
    let emulator = Emulator::start(Options {
        sessions: true,
        ..Options::default()
    });
    let mut config = emulator.config();
    config.auth = RedfishAuth::Session;
    let bmc = emulator.bmc(config);
    assert_eq!(bmc.power_state().await.unwrap(), PowerState::Off);
    bmc.set_next_boot_pxe().await.unwrap();
    assert_eq!(
        bmc.boot_override().await.unwrap().target.as_deref(),
        Some("Pxe")
    );
    // One login served every call.
    assert_eq!(emulator.session_count().await, 1);
    bmc.close().await.unwrap();
    assert_eq!(emulator.session_count().await, 0);
    // Closing again is harmless.
    bmc.close().await.unwrap();
}

#[tokio::test]
async fn session_is_logged_out_on_drop() {
    let emulator = Emulator::start(Options {
        sessions: true,
        ..Options::default()
    });
    let mut config = emulator.config();
    config.auth = RedfishAuth::Session;
    let bmc = emulator.bmc(config);
    bmc.power_state().await.unwrap();
    assert_eq!(emulator.session_count().await, 1);
    drop(bmc);
    let deadline = Instant::now() + CALL_TIMEOUT;
    while emulator.session_count().await != 0 {
        assert!(
            Instant::now() < deadline,
            "session still open {CALL_TIMEOUT:?} after drop"
        );
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

#[tokio::test]
async fn expired_session_logs_in_again() {
    let emulator = Emulator::start(Options {
        sessions: true,
        ..Options::default()
    });
    let mut config = emulator.config();
    config.auth = RedfishAuth::Session;
    let bmc = emulator.bmc(config);
    bmc.power_state().await.unwrap();
    emulator.delete_all_sessions().await;
    assert_eq!(emulator.session_count().await, 0);
    assert_eq!(bmc.power_state().await.unwrap(), PowerState::Off);
    assert_eq!(emulator.session_count().await, 1);
    bmc.close().await.unwrap();
}

#[tokio::test]
async fn tls_is_verified_by_default() {
    let emulator = Emulator::start(Options {
        tls: true,
        ..Options::default()
    });
    let error = emulator
        .bmc(emulator.config())
        .power_state()
        .await
        .unwrap_err();
    let text = error.to_string();
    assert!(matches!(error, BmcError::Failed { .. }), "{error:?}");
    assert!(
        text.contains("certificate") && text.contains("ca_file"),
        "{text}"
    );
}

#[tokio::test]
async fn tls_with_the_bmcs_ca_file_is_verified() {
    let emulator = Emulator::start(Options {
        tls: true,
        ..Options::default()
    });
    // A bare host:port means HTTPS.
    let mut config = emulator.config();
    config.address = format!("127.0.0.1:{}", emulator.port);
    config.ca_file = Some(fixture("tls/ca.pem"));
    let bmc = emulator.bmc(config);
    assert_eq!(bmc.power_state().await.unwrap(), PowerState::Off);
}

#[tokio::test]
async fn insecure_tls_accepts_a_lab_certificate() {
    let emulator = Emulator::start(Options {
        tls: true,
        ..Options::default()
    });
    let mut config = emulator.config();
    config.verify_tls = false;
    let bmc = emulator.bmc(config);
    assert_eq!(bmc.power_state().await.unwrap(), PowerState::Off);
}

// --- Loopback server: for answers an emulator will not give on demand. ---

#[derive(Clone, Debug)]
struct Recorded {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Recorded {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }
}

type Handler = dyn Fn(&Recorded, &[Recorded]) -> Option<String> + Send + Sync;

/// Serves one request per connection with `handler`'s raw answer; `None` holds the
/// connection open without a word. Returns the address and every request received.
async fn loopback(handler: Arc<Handler>) -> (SocketAddr, Arc<Mutex<Vec<Recorded>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let requests = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&requests);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let handler = Arc::clone(&handler);
            let seen = Arc::clone(&seen);
            tokio::spawn(async move { answer(stream, handler, seen).await });
        }
    });
    (address, requests)
}

async fn answer(mut stream: TcpStream, handler: Arc<Handler>, seen: Arc<Mutex<Vec<Recorded>>>) {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(end) = buffer.windows(4).position(|window| window == b"\r\n\r\n") {
            break end;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(read) => buffer.extend_from_slice(&chunk[..read]),
        }
        assert!(buffer.len() < 1 << 20, "request head too large");
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next().unwrap_or_default().split_whitespace();
    let method = request_line.next().unwrap_or_default().to_string();
    let path = request_line.next().unwrap_or_default().to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_string(), value.trim().to_string()))
        .collect();
    let length = headers
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, value)| value.parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = buffer[head_end + 4..].to_vec();
    while body.len() < length {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(read) => body.extend_from_slice(&chunk[..read]),
        }
    }
    let request = Recorded {
        method,
        path,
        headers,
        body,
    };
    let earlier = seen.lock().unwrap().clone();
    let reply = handler(&request, &earlier);
    seen.lock().unwrap().push(request);
    match reply {
        Some(reply) => {
            let _ = stream.write_all(reply.as_bytes()).await;
            let _ = stream.shutdown().await;
        }
        None => {
            // Accept, read, and never answer: hold the connection until the client quits.
            let _ = stream.read(&mut chunk).await;
        }
    }
}

fn http(status: &str, headers: &[(&str, &str)], body: &str) -> String {
    let mut reply = format!(
        "HTTP/1.1 {status}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        reply.push_str(&format!("{name}: {value}\r\n"));
    }
    reply.push_str("\r\n");
    reply.push_str(body);
    reply
}

fn loopback_config(address: SocketAddr, timeout: Duration) -> RedfishConfig {
    let mut config = RedfishConfig::new(format!("http://{address}"), USERNAME, PASSWORD);
    config.timeout = timeout;
    config
}

#[tokio::test]
async fn unanswered_request_times_out_within_the_bound() {
    let (address, requests) = loopback(Arc::new(|_: &Recorded, _: &[Recorded]| None)).await;
    let bound = Duration::from_secs(1);
    let bmc = RedfishBmc::new(loopback_config(address, bound)).unwrap();
    let started = Instant::now();
    let error = bmc.power_off().await.unwrap_err();
    let elapsed = started.elapsed();
    assert!(
        matches!(
            &error,
            BmcError::Timeout {
                operation: "power_off",
                ..
            }
        ),
        "{error:?}"
    );
    assert!(error.to_string().contains("timed out"), "{error}");
    // Generous slack for a loaded machine; an unbounded call would never return at all.
    assert!(
        elapsed < bound + Duration::from_secs(5),
        "took {elapsed:?} for a {bound:?} bound"
    );
    assert_eq!(requests.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn garbage_json_is_a_clear_error() {
    let (address, _) = loopback(Arc::new(|_: &Recorded, _: &[Recorded]| {
        Some(http(
            "200 OK",
            &[("Content-Type", "application/json")],
            "{\"Members\": [ {\"@odata.id\": ",
        ))
    }))
    .await;
    let bmc = RedfishBmc::new(loopback_config(address, CALL_TIMEOUT)).unwrap();
    let error = bmc.power_state().await.unwrap_err();
    let text = error.to_string();
    assert!(
        matches!(
            &error,
            BmcError::Failed {
                operation: "power_state",
                ..
            }
        ),
        "{error:?}"
    );
    assert!(
        text.contains("GET /redfish/v1/Systems") && text.contains("invalid json"),
        "{text}"
    );
}

#[tokio::test]
async fn redfish_error_messages_are_quoted() {
    let (address, _) = loopback(Arc::new(|_: &Recorded, _: &[Recorded]| {
        Some(http(
            "503 Service Unavailable",
            &[("Content-Type", "application/json")],
            &json!({"error": {
                "code": "Base.1.8.GeneralError",
                "message": "A general error has occurred. See ExtendedInfo for more information.",
                "@Message.ExtendedInfo": [{
                    "MessageId": "Base.1.8.ServiceTemporarilyUnavailable",
                    "Message": "The service is temporarily unavailable.  Retry in 30 seconds."
                }]
            }})
            .to_string(),
        ))
    }))
    .await;
    let bmc = RedfishBmc::new(loopback_config(address, CALL_TIMEOUT)).unwrap();
    let text = bmc.discover().await.unwrap_err().to_string();
    assert_eq!(
        text,
        format!(
            "bmc http://{address}: discover failed: GET /redfish/v1/Systems: http 503 Service \
             Unavailable: A general error has occurred. See ExtendedInfo for more information.; \
             The service is temporarily unavailable. Retry in 30 seconds."
        )
    );
}

#[tokio::test]
async fn pxe_patch_asks_for_once_and_retries_with_the_etag() {
    let system = json!({
        "@odata.id": "/redfish/v1/Systems/1",
        "Id": "1",
        "PowerState": "On",
        "Boot": {"BootSourceOverrideTarget": "None", "BootSourceOverrideEnabled": "Disabled"},
        "Actions": {"#ComputerSystem.Reset": {
            "target": "/redfish/v1/Systems/1/Actions/ComputerSystem.Reset"
        }}
    })
    .to_string();
    let (address, requests) = loopback(Arc::new(move |request: &Recorded, _: &[Recorded]| {
        let json = [("Content-Type", "application/json")];
        Some(match (request.method.as_str(), request.path.as_str()) {
            ("GET", "/redfish/v1/Systems") => http(
                "200 OK",
                &json,
                r#"{"Members": [{"@odata.id": "/redfish/v1/Systems/1"}]}"#,
            ),
            ("GET", "/redfish/v1/Systems/1") => http(
                "200 OK",
                &[("Content-Type", "application/json"), ("ETag", "W/\"42\"")],
                &system,
            ),
            ("PATCH", "/redfish/v1/Systems/1")
                if request.header("If-Match") == Some("W/\"42\"") =>
            {
                http("204 No Content", &[], "")
            }
            ("PATCH", "/redfish/v1/Systems/1") => http(
                "428 Precondition Required",
                &json,
                r#"{"error": {"message": "If-Match required"}}"#,
            ),
            _ => http("404 Not Found", &json, r#"{"error": {"message": "no"}}"#),
        })
    }))
    .await;
    let bmc = RedfishBmc::new(loopback_config(address, CALL_TIMEOUT)).unwrap();
    bmc.set_next_boot_pxe().await.unwrap();

    let requests = requests.lock().unwrap().clone();
    let patches: Vec<&Recorded> = requests.iter().filter(|r| r.method == "PATCH").collect();
    assert_eq!(patches.len(), 2, "{requests:#?}");
    for patch in &patches {
        let body: Value = serde_json::from_slice(&patch.body).unwrap();
        assert_eq!(
            body,
            json!({"Boot": {"BootSourceOverrideTarget": "Pxe", "BootSourceOverrideEnabled": "Once"}})
        );
        assert_eq!(patch.header("Content-Type"), Some("application/json"));
        assert!(patch
            .header("Authorization")
            .is_some_and(|v| v.starts_with("Basic ")));
    }
    assert_eq!(patches[0].header("If-Match"), None);
    assert_eq!(patches[1].header("If-Match"), Some("W/\"42\""));
}

/// A system whose reset action advertises `allowed` (or no allow-list at all).
fn system_with_resets(allowed: Option<&[&str]>) -> String {
    let mut reset = json!({"target": "/redfish/v1/Systems/1/Actions/ComputerSystem.Reset"});
    if let Some(allowed) = allowed {
        reset["ResetType@Redfish.AllowableValues"] = json!(allowed);
    }
    json!({
        "@odata.id": "/redfish/v1/Systems/1",
        "Id": "1",
        "PowerState": "On",
        "Actions": {"#ComputerSystem.Reset": reset}
    })
    .to_string()
}

/// A BMC serving one system with `allowed` reset types that accepts every reset.
async fn bmc_offering(
    allowed: Option<&'static [&'static str]>,
) -> (RedfishBmc, Arc<Mutex<Vec<Recorded>>>) {
    let system = system_with_resets(allowed);
    let (address, requests) = loopback(Arc::new(move |request: &Recorded, _: &[Recorded]| {
        let json = [("Content-Type", "application/json")];
        Some(match (request.method.as_str(), request.path.as_str()) {
            ("GET", "/redfish/v1/Systems") => http(
                "200 OK",
                &json,
                r#"{"Members": [{"@odata.id": "/redfish/v1/Systems/1"}]}"#,
            ),
            ("GET", "/redfish/v1/Systems/1") => http("200 OK", &json, &system),
            ("POST", "/redfish/v1/Systems/1/Actions/ComputerSystem.Reset") => {
                http("204 No Content", &[], "")
            }
            _ => http("404 Not Found", &json, r#"{"error": {"message": "no"}}"#),
        })
    }))
    .await;
    (
        RedfishBmc::new(loopback_config(address, CALL_TIMEOUT)).unwrap(),
        requests,
    )
}

fn posts(requests: &Mutex<Vec<Recorded>>) -> Vec<Value> {
    requests
        .lock()
        .unwrap()
        .iter()
        .filter(|request| request.method == "POST")
        .map(|request| serde_json::from_slice(&request.body).unwrap())
        .collect()
}

#[tokio::test]
async fn nmi_is_a_reset_of_type_nmi_when_offered_or_when_nothing_is_listed() {
    for allowed in [Some(&["On", "ForceOff", "Nmi"][..]), None] {
        let (bmc, requests) = bmc_offering(allowed).await;
        bmc.inject_nmi().await.unwrap();
        assert_eq!(
            posts(&requests),
            [json!({"ResetType": "Nmi"})],
            "{allowed:?}"
        );
    }
}

#[tokio::test]
async fn nmi_the_bmc_does_not_offer_is_refused_before_anything_is_sent() {
    let (bmc, requests) = bmc_offering(Some(&["On", "ForceOff", "ForceRestart"])).await;
    assert!(
        bmc.supports_nmi(),
        "the allow-list is read when the NMI is sent"
    );
    let error = bmc.inject_nmi().await.unwrap_err();
    assert!(
        matches!(
            &error,
            BmcError::Failed {
                operation: "inject_nmi",
                ..
            }
        ),
        "{error:?}"
    );
    assert!(
        error.to_string().ends_with(
            "inject_nmi failed: the bmc does not offer ResetType Nmi for /redfish/v1/Systems/1 \
             (it offers On, ForceOff, ForceRestart)"
        ),
        "{error}"
    );
    assert!(posts(&requests).is_empty(), "nothing was posted");

    let (bmc, requests) = bmc_offering(Some(&[])).await;
    let text = bmc.inject_nmi().await.unwrap_err().to_string();
    assert!(text.ends_with("(it offers none)"), "{text}");
    assert!(posts(&requests).is_empty());
}
