//! The daemon's connection bounds (`bearman::edge`) against the attacks that took the
//! old accept loop down, over real loopback sockets: idle connections beyond the cap,
//! a head that never completes, a body that never arrives, a kept-alive connection left
//! open, one source flooding the boot protocol. Timeouts are set to a second or two here
//! so the test runs quickly; the assertions are about what happens (closed, answered,
//! refused), with generous bounds on when.

use std::time::Duration;

use bearman::edge::{ConnectionLimits, EdgeLimits};
use bearman_e2e::{Options, TestDaemon};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn limits(connections_max: usize) -> EdgeLimits {
    EdgeLimits {
        connections: ConnectionLimits {
            header_read_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(2),
            body_read_timeout: Duration::from_secs(1),
            send_stall_timeout: Duration::from_secs(2),
            connections_max,
        },
        ..EdgeLimits::default()
    }
}

async fn daemon_with(edge: EdgeLimits) -> TestDaemon {
    TestDaemon::sqlite(Options {
        edge,
        ..Options::default()
    })
    .await
}

/// Reads until the peer closes (Ok(bytes)) or `within` passes (Err).
async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> Result<Vec<u8>, ()> {
    let mut seen = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    };
    match tokio::time::timeout(within, read).await {
        Ok(()) => Ok(seen),
        Err(_) => Err(()),
    }
}

async fn healthz_answers(daemon: &TestDaemon) {
    let response = tokio::time::timeout(
        Duration::from_secs(10),
        daemon.request("GET", "/healthz", None, None),
    )
    .await
    .expect("/healthz answered within 10 s");
    assert_eq!(response.status, 200);
}

#[tokio::test]
async fn more_idle_connections_than_the_cap_do_not_stop_healthz_or_the_boot_path() {
    let cap = 32;
    let daemon = daemon_with(EdgeLimits {
        connections: ConnectionLimits {
            // Long enough that the idle connections are still open when we ask.
            header_read_timeout: Duration::from_secs(60),
            ..limits(cap).connections
        },
        ..EdgeLimits::default()
    })
    .await;
    // Ten times the cap, sending nothing: the attack that used every descriptor.
    let mut idle = Vec::new();
    for _ in 0..cap * 10 {
        idle.push(TcpStream::connect(daemon.address).await.expect("connect"));
    }
    for _ in 0..5 {
        healthz_answers(&daemon).await;
        let script = tokio::time::timeout(
            Duration::from_secs(10),
            daemon.request("GET", "/ipxe", None, None),
        )
        .await
        .expect("/ipxe answered within 10 s");
        assert_eq!(script.status, 200);
        assert!(script.text().starts_with("#!ipxe"));
    }
    // The oldest idle connections were closed to make room.
    let mut closed = 0;
    for stream in idle.iter_mut().take(cap) {
        if read_until_closed(stream, Duration::from_secs(5))
            .await
            .is_ok()
        {
            closed += 1;
        }
    }
    assert!(
        closed > 0,
        "some of the oldest idle connections were closed"
    );
}

#[tokio::test]
async fn a_head_that_never_completes_is_closed_after_the_header_timeout() {
    let daemon = daemon_with(limits(64)).await;
    let mut slow = TcpStream::connect(daemon.address).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // Trickle one header byte at a time, never ending the head.
    let trickle = async {
        for _ in 0..20 {
            if slow.write_all(b"X").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), trickle).await;
    let outcome = read_until_closed(&mut slow, Duration::from_secs(5)).await;
    assert!(outcome.is_ok(), "the partial-head connection was closed");
    healthz_answers(&daemon).await;
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_after_the_header_timeout() {
    let daemon = daemon_with(limits(64)).await;
    let mut silent = TcpStream::connect(daemon.address).await.unwrap();
    let outcome = read_until_closed(&mut silent, Duration::from_secs(10)).await;
    assert_eq!(outcome, Ok(Vec::new()), "closed without an answer");
}

#[tokio::test]
async fn a_kept_alive_connection_serves_several_requests_then_is_closed_when_idle() {
    let daemon = daemon_with(limits(64)).await;
    let mut stream = TcpStream::connect(daemon.address).await.unwrap();
    for _ in 0..3 {
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("answer")
            .unwrap();
        let head = String::from_utf8_lossy(&buf[..n]).to_string();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        // Idle for less than the idle timeout, but longer than the header timeout: a
        // kept-alive connection between requests is not held to the head's bound.
        tokio::time::sleep(Duration::from_millis(1_300)).await;
    }
    let outcome = read_until_closed(&mut stream, Duration::from_secs(10)).await;
    assert!(outcome.is_ok(), "closed after the idle timeout");
}

#[tokio::test]
async fn a_later_head_on_a_kept_alive_connection_has_the_header_bound_not_the_idle_one() {
    // A long idle bound: the watchdog must still notice the second head's 1 s bound
    // though nothing wakes it when that head starts (it looks at least every 1 s).
    let mut edge = limits(64);
    edge.connections.idle_timeout = Duration::from_secs(30);
    edge.connections.send_stall_timeout = Duration::from_secs(30);
    let daemon = daemon_with(edge).await;
    let mut stream = TcpStream::connect(daemon.address).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .expect("answer")
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let trickle = async {
        for _ in 0..50 {
            if stream.write_all(b"X").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let started = tokio::time::Instant::now();
    let _ = tokio::time::timeout(Duration::from_secs(10), trickle).await;
    let outcome = read_until_closed(&mut stream, Duration::from_secs(5)).await;
    assert!(outcome.is_ok(), "the trickled second head was closed");
    // Far below the 30 s idle bound (the head's bound is 1 s; the margin is for a busy
    // machine, not a measurement).
    assert!(
        started.elapsed() < Duration::from_secs(12),
        "closed after {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_body_that_never_arrives_is_refused_and_the_connection_freed() {
    let daemon = daemon_with(limits(64)).await;
    let mut stream = TcpStream::connect(daemon.address).await.unwrap();
    stream
        .write_all(
            b"POST /ipxe/00000000-0000-4000-8000-000000000001/heartbeat HTTP/1.1\r\nHost: x\r\n\
              Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"a\":",
        )
        .await
        .unwrap();
    let answer = read_until_closed(&mut stream, Duration::from_secs(10))
        .await
        .expect("answered and closed within 10 s");
    let text = String::from_utf8_lossy(&answer).to_string();
    assert!(
        text.starts_with("HTTP/1.1 4"),
        "a client error for the unfinished body: {text}"
    );
    healthz_answers(&daemon).await;
}

#[tokio::test]
async fn one_source_flooding_the_boot_protocol_gets_429_and_the_admin_api_still_answers() {
    let daemon = daemon_with(EdgeLimits {
        rate: bearman::core::rate_limit::RateLimitConfig {
            per_s: 5,
            burst: 20,
            sources_max: 16,
        },
        ..EdgeLimits::default()
    })
    .await;
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for _ in 0..40 {
        let response = daemon.request("GET", "/ipxe", None, None).await;
        if response.status == 429 {
            retry_after = response.header("retry-after").map(str::to_string);
        }
        statuses.push(response.status);
    }
    let allowed = statuses.iter().filter(|s| **s == 200).count();
    let refused = statuses.iter().filter(|s| **s == 429).count();
    // 20 at once, and at most a few refilled while the loop ran.
    assert!(
        (20..=30).contains(&allowed),
        "allowed {allowed}: {statuses:?}"
    );
    assert_eq!(allowed + refused, 40, "{statuses:?}");
    let retry_after: u64 = retry_after
        .expect("a 429 carries Retry-After")
        .parse()
        .unwrap();
    assert!(retry_after >= 1);
    // The admin API is not rate-limited by source (it is authenticated), nor /healthz.
    let (status, _) = daemon.admin("GET", "/nodes", None).await;
    assert_eq!(status, 200);
    healthz_answers(&daemon).await;
    // The budget comes back.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(daemon.request("GET", "/ipxe", None, None).await.status, 200);
}
