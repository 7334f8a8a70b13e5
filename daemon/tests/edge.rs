//! The accept loop (`bearman::edge::serve_listener`) on real loopback sockets with a
//! service of the test's own: what it does at the cap, to slow requests, on shutdown.
//! (The daemon's attacks against the whole service are in tests/tests/connection_limits.rs.)

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use bearman::edge::{serve_listener, ConnectionLimits, WithConnectInfo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

/// `/slow` answers after `SLOW`, everything else at once.
const SLOW: Duration = Duration::from_millis(1_500);

async fn start(limits: ConnectionLimits) -> (SocketAddr, watch::Sender<bool>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let service = tower::service_fn(|request: Request| async move {
        if request.uri().path() == "/slow" {
            tokio::time::sleep(SLOW).await;
        }
        Ok::<_, std::convert::Infallible>(Response::new(Body::from("done")))
    });
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(serve_listener(
        listener,
        WithConnectInfo(service),
        limits,
        None,
        stopped,
    ));
    (address, stop)
}

async fn get(stream: &mut TcpStream, path: &str) -> String {
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
        .await
        .expect("an answer")
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(within, stream.read(&mut buf)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

#[tokio::test]
async fn at_the_cap_the_oldest_idle_connection_goes_and_a_request_in_flight_finishes() {
    let (address, _stop) = start(ConnectionLimits {
        connections_max: 2,
        header_read_timeout: Duration::from_secs(60),
        idle_timeout: Duration::from_secs(60),
        ..ConnectionLimits::default()
    })
    .await;
    // The oldest connection is busy with a slow request.
    let mut busy = TcpStream::connect(address).await.unwrap();
    busy.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The second one is idle.
    let mut idle = TcpStream::connect(address).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // A third arrives: the idle one makes room, the busy one is left alone.
    let mut third = TcpStream::connect(address).await.unwrap();
    assert!(get(&mut third, "/fast").await.starts_with("HTTP/1.1 200"));
    assert!(closed_within(&mut idle, Duration::from_secs(5)).await);
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(10), busy.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn a_slow_request_is_not_cut_by_the_head_or_idle_timeouts() {
    let (address, _stop) = start(ConnectionLimits {
        header_read_timeout: Duration::from_millis(300),
        idle_timeout: Duration::from_millis(300),
        ..ConnectionLimits::default()
    })
    .await;
    let mut stream = TcpStream::connect(address).await.unwrap();
    // Five times the idle and head bounds, in flight.
    assert!(get(&mut stream, "/slow").await.starts_with("HTTP/1.1 200"));
    // Then idle: closed.
    assert!(closed_within(&mut stream, Duration::from_secs(5)).await);
}

#[tokio::test]
async fn shutdown_lets_the_request_in_flight_finish_then_returns() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let service = tower::service_fn(|_: Request| async move {
        tokio::time::sleep(SLOW).await;
        Ok::<_, std::convert::Infallible>(Response::new(Body::from("done")))
    });
    let (stop, stopped) = watch::channel(false);
    let served = tokio::spawn(serve_listener(
        listener,
        WithConnectInfo(service),
        ConnectionLimits::default(),
        None,
        stopped,
    ));
    let mut stream = TcpStream::connect(address).await.unwrap();
    stream
        .write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.send(true).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    tokio::time::timeout(Duration::from_secs(5), served)
        .await
        .expect("returns once the connection closed")
        .unwrap()
        .unwrap();
    assert!(
        TcpStream::connect(address).await.is_err(),
        "no longer listening"
    );
}
