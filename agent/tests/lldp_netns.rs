//! LLDP heard on a real wire: two network namespaces joined by veth pairs, a fake switch
//! sending crafted LLDP frames from one end with an `AF_PACKET` socket, and the stage-1
//! listener on the other end.
//!
//! Needs root (network namespaces, raw sockets). This test REQUIRES it and fails loudly
//! otherwise: the machines the suite runs on allow it, and a silently skipped wire test
//! would pass without having checked anything.

use std::io;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bearman_agent::lldp::ETHERTYPE_LLDP;
use bearman_agent::stage1::lldp_listen::{listen_all, NicLldp, Outcome, LLDP_MULTICAST};
use bearman_proto::LldpNeighbor;

const SWITCH_MAC: [u8; 6] = [0x02, 0x42, 0xac, 0x11, 0x00, 0x02];
/// Bound on the fake switch: it stops after this many frames even if nobody tells it to.
const FRAMES_SENT_MAX: u32 = 400;
const SEND_PERIOD: Duration = Duration::from_millis(25);

/// Runs `ip args…`, panicking with its stderr when it fails.
fn ip(args: &[&str]) {
    let output = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|error| {
            panic!(
                "running ip {}: {error} (is iproute2 installed?)",
                args.join(" ")
            )
        });
    assert!(
        output.status.success(),
        "ip {} failed ({}): {}\nthis test needs root and network namespaces (ip netns); it does not skip",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
}

/// Network namespaces that are deleted when the test ends, however it ends.
struct Namespaces {
    names: Vec<String>,
}

impl Namespaces {
    fn create(names: &[String]) -> Namespaces {
        let mut guard = Namespaces { names: Vec::new() };
        for name in names {
            ip(&["netns", "add", name]);
            guard.names.push(name.clone());
        }
        guard
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in &self.names {
            let status = Command::new("ip").args(["netns", "del", name]).status();
            if !matches!(status, Ok(status) if status.success()) {
                eprintln!("warning: could not delete network namespace {name}: {status:?}");
            }
        }
    }
}

/// Moves the calling thread into the named network namespace.
fn enter(namespace: &str) {
    let path = format!("/run/netns/{namespace}");
    let file = std::fs::File::open(&path).unwrap_or_else(|error| panic!("{path}: {error}"));
    // SAFETY: setns on a valid namespace descriptor; only this thread changes namespace.
    let result = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(
        result,
        0,
        "setns into {namespace}: {}",
        io::Error::last_os_error()
    );
}

fn tlv(kind: u8, value: &[u8]) -> Vec<u8> {
    let header = (u16::from(kind) << 9) | value.len() as u16;
    let mut out = header.to_be_bytes().to_vec();
    out.extend_from_slice(value);
    out
}

/// An LLDP frame as a switch port sends it; without `port` it lacks the mandatory port id.
fn lldp_frame(port: Option<&str>) -> Vec<u8> {
    let mut frame = LLDP_MULTICAST.to_vec();
    frame.extend_from_slice(&SWITCH_MAC);
    frame.extend_from_slice(&ETHERTYPE_LLDP.to_be_bytes());
    let mut chassis = vec![4];
    chassis.extend_from_slice(&SWITCH_MAC);
    frame.extend(tlv(1, &chassis));
    if let Some(port) = port {
        let mut port_id = vec![5];
        port_id.extend_from_slice(port.as_bytes());
        frame.extend(tlv(2, &port_id));
    }
    frame.extend(tlv(3, &120u16.to_be_bytes()));
    frame.extend(tlv(5, b"tor-test"));
    frame.extend(tlv(127, &[0x00, 0x80, 0xc2, 0x01, 0x00, 42]));
    frame.extend(tlv(0, &[]));
    frame
}

/// The fake switch: from `namespace`, sends a frame the parser refuses, then a good one
/// every [`SEND_PERIOD`] out of `nic` until `stop` (at most [`FRAMES_SENT_MAX`]).
fn switch(namespace: &str, nic: &str, stop: &AtomicBool) -> u32 {
    enter(namespace);
    let name = std::ffi::CString::new(nic).unwrap();
    // SAFETY: valid NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert_ne!(
        ifindex,
        0,
        "{nic} in {namespace}: {}",
        io::Error::last_os_error()
    );
    // SAFETY: plain socket(2); checked below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "packet socket: {}", io::Error::last_os_error());
    // SAFETY: sockaddr_ll is plain data; all-zero is valid.
    let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    to.sll_family = libc::AF_PACKET as u16;
    to.sll_protocol = ETHERTYPE_LLDP.to_be();
    to.sll_ifindex = ifindex as i32;
    to.sll_halen = 6;
    to.sll_addr[..6].copy_from_slice(&LLDP_MULTICAST);
    let bad = lldp_frame(None);
    let good = lldp_frame(Some("Ethernet7"));
    let mut sent = 0;
    while !stop.load(Ordering::SeqCst) && sent < FRAMES_SENT_MAX {
        let frame = if sent == 0 { &bad } else { &good };
        // SAFETY: `frame` and `to` are valid for the lengths passed.
        let result = unsafe {
            libc::sendto(
                fd,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&to as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        assert_eq!(
            result,
            frame.len() as isize,
            "sendto on {nic}: {}",
            io::Error::last_os_error()
        );
        sent += 1;
        std::thread::sleep(SEND_PERIOD);
    }
    // SAFETY: `fd` is ours and closed once.
    unsafe { libc::close(fd) };
    sent
}

#[test]
fn the_listener_hears_the_switch_on_its_nic_and_reports_silence_and_errors_on_others() {
    let pid = std::process::id();
    let host_ns = format!("bm-lldp-{pid}-host");
    let switch_ns = format!("bm-lldp-{pid}-switch");
    let _namespaces = Namespaces::create(&[host_ns.clone(), switch_ns.clone()]);
    // eth-a <-> sw-a carries LLDP; eth-b <-> sw-b stays silent, and eth-b is left down for
    // the listener to bring up (stage 1's init script only brings up its DHCP NIC).
    for (nic, port) in [("eth-a", "sw-a"), ("eth-b", "sw-b")] {
        ip(&[
            "-n", &host_ns, "link", "add", nic, "type", "veth", "peer", "name", port, "netns",
            &switch_ns,
        ]);
        ip(&["-n", &switch_ns, "link", "set", port, "up"]);
    }
    ip(&["-n", &host_ns, "link", "set", "eth-a", "up"]);

    let wait = Duration::from_secs(3);
    let listener_ns = host_ns.clone();
    let listener = std::thread::spawn(move || {
        enter(&listener_ns);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let nics = ["eth-a", "eth-b", "nosuch0"].map(String::from);
        runtime.block_on(listen_all(&nics, wait))
    });
    let stop = Arc::new(AtomicBool::new(false));
    let switch_stop = stop.clone();
    let switch_ns_name = switch_ns.clone();
    let sender = std::thread::spawn(move || switch(&switch_ns_name, "sw-a", &switch_stop));

    let heard = listener.join().expect("listener thread");
    stop.store(true, Ordering::SeqCst);
    let sent = sender.join().expect("switch thread");
    assert!(sent >= 2, "the switch sent {sent} frame(s)");

    assert_eq!(
        heard,
        vec![
            NicLldp {
                nic: "eth-a".into(),
                outcome: Outcome::Heard(LldpNeighbor {
                    chassis_id: "02:42:ac:11:00:02".into(),
                    port_id: "Ethernet7".into(),
                    vlan: Some(42),
                    system_name: Some("tor-test".into()),
                }),
            },
            NicLldp {
                nic: "eth-b".into(),
                outcome: Outcome::Silent {
                    wait,
                    refused: None
                },
            },
            NicLldp {
                nic: "nosuch0".into(),
                outcome: Outcome::Failed("no such interface nosuch0".into()),
            },
        ]
    );
    let lines: Vec<String> = heard.iter().map(NicLldp::console_line).collect();
    assert_eq!(
        lines,
        [
            "lldp: eth-a: chassis 02:42:ac:11:00:02, port Ethernet7, vlan 42 (tor-test)",
            "lldp: no LLDP frame on eth-b within 3 s",
            "lldp: no such interface nosuch0; registering nosuch0 without its neighbour",
        ]
    );
    // The listener brought the silent NIC up so that a switch could have been heard.
    let link = Command::new("ip")
        .args(["-n", &host_ns, "-o", "link", "show", "eth-b"])
        .output()
        .unwrap();
    let link = String::from_utf8_lossy(&link.stdout);
    assert!(link.contains(",UP"), "{link}");
}
