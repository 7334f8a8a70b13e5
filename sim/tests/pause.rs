//! The carried turmoil patch (`vendor/turmoil`): `Sim::pause`/`Sim::resume` stop one host's
//! world while time goes on, and on resume its clock jumps over what it missed.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What the paused host saw: when each of its one-second timers fired (virtual seconds,
/// by its own clock) and when each message reached it.
#[derive(Default)]
struct Seen {
    ticks: Vec<u64>,
    messages: Vec<(u64, u8)>,
}

fn at() -> u64 {
    turmoil::sim_elapsed().unwrap().as_millis() as u64 / 1000
}

#[test]
fn a_paused_host_runs_nothing_then_wakes_with_its_clock_jumped() {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut sim = turmoil::Builder::new()
        .simulation_duration(Duration::from_secs(120))
        .tick_duration(Duration::from_millis(100))
        .build();
    {
        let seen = seen.clone();
        sim.host("sleeper", move || {
            let seen = seen.clone();
            async move {
                let listener = turmoil::net::TcpListener::bind(("0.0.0.0", 9)).await?;
                let messages = seen.clone();
                tokio::task::spawn_local(async move {
                    loop {
                        let (mut stream, _) = listener.accept().await.unwrap();
                        let mut byte = [0u8];
                        stream.read_exact(&mut byte).await.unwrap();
                        messages.lock().unwrap().messages.push((at(), byte[0]));
                    }
                });
                let mut ticker = tokio::time::interval(Duration::from_secs(1));
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    ticker.tick().await;
                    seen.lock().unwrap().ticks.push(at());
                }
            }
        });
    }
    sim.client("sender", async {
        tokio::time::sleep(Duration::from_secs(8)).await;
        let mut stream = turmoil::net::TcpStream::connect(("sleeper", 9)).await?;
        stream.write_all(&[7]).await?;
        tokio::time::sleep(Duration::from_secs(30)).await;
        Ok(())
    });
    let mut paused_at_least_once = false;
    while sim.elapsed() < Duration::from_secs(30) {
        if sim.elapsed() == Duration::from_secs(5) {
            sim.pause("sleeper");
            assert!(sim.is_host_paused("sleeper"));
            paused_at_least_once = true;
        }
        if sim.elapsed() == Duration::from_secs(20) {
            sim.resume("sleeper");
            assert!(!sim.is_host_paused("sleeper"));
        }
        sim.step().unwrap();
    }
    assert!(paused_at_least_once);
    let seen = seen.lock().unwrap();
    // Ticks every second up to the pause, none while paused, then on from the wake-up.
    let during: Vec<u64> = seen
        .ticks
        .iter()
        .copied()
        .filter(|t| (6..20).contains(t))
        .collect();
    assert!(during.is_empty(), "ticks while paused: {during:?}");
    assert!(seen.ticks.contains(&4), "ticks before: {:?}", seen.ticks);
    let after: Vec<u64> = seen.ticks.iter().copied().filter(|t| *t >= 20).collect();
    assert_eq!(
        after.first(),
        Some(&20),
        "the overdue timer fires at the wake-up"
    );
    assert!(after.len() >= 8, "ticks after the wake-up: {after:?}");
    // The message sent at 8 s waited on the network and arrived once the host woke.
    assert_eq!(seen.messages, vec![(20, 7)]);
}

#[test]
fn a_crashed_host_refuses_connections_at_once() {
    let mut sim = turmoil::Builder::new()
        .simulation_duration(Duration::from_secs(60))
        .tick_duration(Duration::from_millis(10))
        .build();
    sim.host("server", || async {
        let listener = turmoil::net::TcpListener::bind(("0.0.0.0", 9)).await?;
        loop {
            let _ = listener.accept().await?;
        }
    });
    let refused_after = Arc::new(Mutex::new(None));
    {
        let refused_after = refused_after.clone();
        sim.client("client", async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let started = tokio::time::Instant::now();
            let result = turmoil::net::TcpStream::connect(("server", 9)).await;
            assert_eq!(
                result.err().map(|e| e.kind()),
                Some(std::io::ErrorKind::ConnectionRefused)
            );
            *refused_after.lock().unwrap() = Some(started.elapsed());
            Ok(())
        });
    }
    for _ in 0..100 {
        sim.step().unwrap();
    }
    sim.crash("server");
    sim.run().unwrap();
    let after = refused_after.lock().unwrap().expect("the client ran");
    assert!(after < Duration::from_secs(1), "refused after {after:?}");
}

#[test]
fn an_answer_sent_to_a_paused_host_is_read_when_it_wakes() {
    let got = Arc::new(Mutex::new(None));
    let mut sim = turmoil::Builder::new()
        .simulation_duration(Duration::from_secs(120))
        .tick_duration(Duration::from_millis(10))
        .build();
    sim.host("responder", || async {
        let listener = turmoil::net::TcpListener::bind(("0.0.0.0", 9)).await?;
        loop {
            let (mut stream, _) = listener.accept().await?;
            tokio::task::spawn_local(async move {
                let mut byte = [0u8];
                stream.read_exact(&mut byte).await.unwrap();
                tokio::time::sleep(Duration::from_secs(1)).await;
                stream.write_all(&[byte[0] + 1]).await.unwrap();
            });
        }
    });
    {
        let got = got.clone();
        sim.host("asker", move || {
            let got = got.clone();
            async move {
                tokio::time::sleep(Duration::from_secs(2)).await;
                let mut stream = turmoil::net::TcpStream::connect(("responder", 9)).await?;
                stream.write_all(&[41]).await?;
                let mut byte = [0u8];
                let read =
                    tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut byte))
                        .await;
                *got.lock().unwrap() = Some((at(), read.is_ok(), byte[0]));
                std::future::pending::<()>().await;
                Ok(())
            }
        });
    }
    let mut paused = false;
    while sim.elapsed() < Duration::from_secs(60) {
        if !paused && sim.elapsed() >= Duration::from_millis(2300) {
            sim.pause("asker");
            paused = true;
        }
        if sim.elapsed() == Duration::from_secs(30) {
            sim.resume("asker");
        }
        sim.step().unwrap();
    }
    assert_eq!(*got.lock().unwrap(), Some((30, true, 42)));
}
