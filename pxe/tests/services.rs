//! The PXE services on real sockets (127.0.0.1, ports the kernel picks): good clients are
//! answered, a real TFTP client (curl) downloads a boot file byte for byte, paths cannot
//! leave the root, limits hold, and hundreds of malformed, truncated and oversized DHCP
//! and TFTP datagrams are dropped without stopping the service for good clients.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use bearman_pxe::dhcp::PACKET_BYTES_MAX;
use bearman_pxe::serve::PxeStats;
use bearman_pxe::{PxeConfig, PxeFileConfig, PxeServices};
use dhcproto::v4::{Architecture, DhcpOption, Message, MessageType, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};
use tokio::net::UdpSocket;

const WAIT: Duration = Duration::from_secs(5);
const QUIET: Duration = Duration::from_millis(300);

/// A deterministic generator, so a failing run can be replayed (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

fn boot_file(len: usize) -> Vec<u8> {
    let mut rng = Rng(7);
    rng.bytes(len)
}

struct Fixture {
    root: tempfile::TempDir,
    services: PxeServices,
    file: Vec<u8>,
}

fn config(root: &Path, extra: &str) -> PxeConfig {
    let text = format!(
        r#"server_address = "127.0.0.1"
dhcp_listen = "127.0.0.1:0"
pxe_listen = "127.0.0.1:0"
tftp_listen = "127.0.0.1:0"
tftp_root = "{}"
tftp_timeout_ms = 200
tftp_retries_max = 2
tftp_file_bytes_max = 1000000
{extra}"#,
        root.display()
    );
    toml::from_str::<PxeFileConfig>(&text)
        .unwrap()
        .resolve("http://127.0.0.1:8080", root)
        .unwrap()
}

async fn start(extra: &str) -> Fixture {
    let root = tempfile::tempdir().unwrap();
    let file = boot_file(300_000);
    std::fs::write(root.path().join("undionly.kpxe"), &file).unwrap();
    std::fs::write(root.path().join("ipxe.efi"), b"efi").unwrap();
    std::fs::write(root.path().join("huge.bin"), vec![0u8; 1_000_001]).unwrap();
    std::fs::create_dir(root.path().join("dir")).unwrap();
    // A link out of the root must not be followed.
    std::os::unix::fs::symlink("/etc/passwd", root.path().join("passwd")).unwrap();
    let services = bearman_pxe::start(config(root.path(), extra))
        .await
        .unwrap();
    Fixture {
        root,
        services,
        file,
    }
}

fn dhcp_request(
    kind: MessageType,
    mac: u8,
    class: &str,
    arch: u16,
    user: Option<&[u8]>,
) -> Vec<u8> {
    let mut message = Message::default();
    message
        .set_xid(0xbea0_0000 | u32::from(mac))
        .set_chaddr(&[0x52, 0x54, 0, 0xbe, 0xa0, mac]);
    let opts = message.opts_mut();
    opts.insert(DhcpOption::MessageType(kind));
    opts.insert(DhcpOption::ClassIdentifier(class.as_bytes().to_vec()));
    opts.insert(DhcpOption::ClientSystemArchitecture(Architecture::from(
        arch,
    )));
    if let Some(user) = user {
        opts.insert(DhcpOption::UserClass(user.to_vec()));
    }
    let mut bytes = Vec::new();
    message.encode(&mut Encoder::new(&mut bytes)).unwrap();
    bytes
}

async fn recv(socket: &UdpSocket, within: Duration) -> Option<(Vec<u8>, SocketAddr)> {
    let mut buffer = vec![0u8; 70_000];
    match tokio::time::timeout(within, socket.recv_from(&mut buffer)).await {
        Ok(Ok((len, from))) => Some((buffer[..len].to_vec(), from)),
        _ => None,
    }
}

/// A PXE client asks port 4011 and gets its boot file; returns the file named.
async fn ask_pxe(
    services: &PxeServices,
    mac: u8,
    arch: u16,
    user: Option<&[u8]>,
) -> Option<String> {
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let request = dhcp_request(
        MessageType::Request,
        mac,
        "PXEClient:Arch:00000:UNDI:002001",
        arch,
        user,
    );
    client.send_to(&request, services.pxe_addr).await.unwrap();
    let (reply, from) = recv(&client, WAIT).await?;
    assert_eq!(from, services.pxe_addr);
    let ack = Message::decode(&mut Decoder::new(&reply)).unwrap();
    assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
    assert_eq!(ack.xid(), 0xbea0_0000 | u32::from(mac));
    assert_eq!(ack.yiaddr(), Ipv4Addr::UNSPECIFIED);
    match ack.opts().get(OptionCode::BootfileName) {
        Some(DhcpOption::BootfileName(file)) => Some(String::from_utf8(file.clone()).unwrap()),
        other => panic!("no boot file: {other:?}"),
    }
}

fn rrq(name: &str, options: &[(&str, &str)]) -> Vec<u8> {
    let mut packet = vec![0, 1];
    for part in [name, "octet"]
        .into_iter()
        .chain(options.iter().flat_map(|(k, v)| [*k, *v]))
    {
        packet.extend_from_slice(part.as_bytes());
        packet.push(0);
    }
    packet
}

fn ack(block: u16) -> Vec<u8> {
    let mut packet = vec![0, 4];
    packet.extend_from_slice(&block.to_be_bytes());
    packet
}

/// A minimal lock-step TFTP client; returns the file or the server's error message.
async fn tftp_get(
    server: SocketAddr,
    name: &str,
    options: &[(&str, &str)],
) -> Result<Vec<u8>, String> {
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    client.send_to(&rrq(name, options), server).await.unwrap();
    let mut data = Vec::new();
    let blksize = options
        .iter()
        .find(|(k, _)| *k == "blksize")
        .map_or(512, |(_, v)| v.parse::<usize>().unwrap());
    loop {
        let (packet, from) = recv(&client, WAIT).await.ok_or("no answer")?;
        let opcode = u16::from_be_bytes([packet[0], packet[1]]);
        if opcode != 5 {
            assert_ne!(from, server, "transfers come from their own port (TID)");
        }
        match opcode {
            5 => return Err(String::from_utf8_lossy(&packet[4..packet.len() - 1]).into_owned()),
            6 => client.send_to(&ack(0), from).await.map(drop).unwrap(),
            3 => {
                let block = u16::from_be_bytes([packet[2], packet[3]]);
                data.extend_from_slice(&packet[4..]);
                client.send_to(&ack(block), from).await.unwrap();
                if packet.len() - 4 < blksize {
                    return Ok(data);
                }
            }
            other => return Err(format!("unexpected opcode {other}")),
        }
    }
}

#[tokio::test]
async fn clients_get_the_file_for_their_architecture_and_ipxe_gets_the_script() {
    let fixture = start("").await;
    let services = &fixture.services;
    assert_eq!(
        ask_pxe(services, 1, 0, None).await.as_deref(),
        Some("undionly.kpxe")
    );
    assert_eq!(
        ask_pxe(services, 2, 7, None).await.as_deref(),
        Some("ipxe.efi")
    );
    assert_eq!(
        ask_pxe(services, 3, 7, Some(b"iPXE")).await.as_deref(),
        Some("http://127.0.0.1:8080/ipxe")
    );
    // Not a netboot client: no answer at all (the site's DHCP server's business).
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let plain = dhcp_request(MessageType::Request, 4, "udhcp 1.36.1", 0, None);
    client.send_to(&plain, services.pxe_addr).await.unwrap();
    assert!(recv(&client, QUIET).await.is_none());
}

#[tokio::test]
async fn a_boot_file_arrives_whole_with_options_and_without() {
    let fixture = start("").await;
    let tftp = fixture.services.tftp_addr;
    assert_eq!(
        tftp_get(tftp, "undionly.kpxe", &[]).await.unwrap(),
        fixture.file
    );
    assert_eq!(
        tftp_get(
            tftp,
            "/undionly.kpxe",
            &[("blksize", "1468"), ("tsize", "0")]
        )
        .await
        .unwrap(),
        fixture.file
    );
    assert_eq!(
        tftp_get(tftp, "ipxe.efi", &[("blksize", "1468")])
            .await
            .unwrap(),
        b"efi"
    );
    // The server counts a transfer when the last ACK arrives, just after the client is
    // done: wait for it, bounded.
    let stats = &fixture.services.stats;
    let deadline = tokio::time::Instant::now() + WAIT;
    while PxeStats::get(&stats.tftp_transfers_done) < 3 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(PxeStats::get(&stats.tftp_transfers_done), 3);
    assert_eq!(PxeStats::get(&stats.tftp_bytes_sent), 2 * 300_000 + 3);
}

/// Transfers share one cached copy of a file, but a replaced file is read again.
#[tokio::test]
async fn a_replaced_boot_file_is_served_as_it_is_now() {
    let fixture = start("").await;
    let tftp = fixture.services.tftp_addr;
    assert_eq!(tftp_get(tftp, "ipxe.efi", &[]).await.unwrap(), b"efi");
    std::fs::write(fixture.root.path().join("ipxe.efi"), b"a newer ipxe.efi").unwrap();
    assert_eq!(
        tftp_get(tftp, "ipxe.efi", &[]).await.unwrap(),
        b"a newer ipxe.efi"
    );
}

/// curl is an independent TFTP client (RFC 2347/2348/2349 options included): what it
/// downloads must be the file.
#[tokio::test]
async fn curl_downloads_a_boot_file_over_tftp() {
    let fixture = start("").await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("got");
    let url = format!("tftp://{}/undionly.kpxe", fixture.services.tftp_addr);
    let output = tokio::task::spawn_blocking(move || {
        Command::new("curl")
            .args([
                "--silent",
                "--show-error",
                "--max-time",
                "20",
                "--tftp-blksize",
                "1400",
                "-o",
            ])
            .arg(&out)
            .arg(&url)
            .output()
            .map(|output| (output, std::fs::read(&out)))
    })
    .await
    .unwrap()
    .expect("curl is installed by scripts/install-deps.sh");
    let (output, got) = output;
    assert!(
        output.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(got.unwrap(), fixture.file);
}

#[tokio::test]
async fn nothing_outside_the_root_or_over_the_limit_is_served() {
    let fixture = start("").await;
    let tftp = fixture.services.tftp_addr;
    for name in [
        "../../../etc/passwd",
        "passwd",
        "huge.bin",
        "dir",
        "missing.efi",
        ".hidden",
        "a\\b",
    ] {
        let error = tftp_get(tftp, name, &[]).await.unwrap_err();
        assert_eq!(error, "file not found", "{name}");
    }
    // Write requests and netascii are refused by name.
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut wrq = rrq("undionly.kpxe", &[]);
    wrq[1] = 2;
    client.send_to(&wrq, tftp).await.unwrap();
    let (reply, _) = recv(&client, WAIT).await.unwrap();
    assert_eq!(&reply[..4], &[0, 5, 0, 2], "access violation");
    assert_eq!(
        PxeStats::get(&fixture.services.stats.tftp_transfers_done),
        0
    );
}

#[tokio::test]
async fn transfers_are_capped_and_a_stranger_gets_unknown_tid() {
    let fixture = start("tftp_transfers_max = 1").await;
    let tftp = fixture.services.tftp_addr;
    // One client starts and never ACKs: it holds the only slot until it times out.
    let stalled = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    stalled
        .send_to(&rrq("undionly.kpxe", &[]), tftp)
        .await
        .unwrap();
    let (_, transfer_port) = recv(&stalled, WAIT).await.unwrap();
    assert_eq!(
        tftp_get(tftp, "ipxe.efi", &[]).await.unwrap_err(),
        "server busy, retry"
    );
    // Somebody else writing to the transfer's port gets error 5; the transfer goes on.
    let stranger = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    stranger.send_to(&ack(1), transfer_port).await.unwrap();
    let (reply, _) = recv(&stranger, WAIT).await.unwrap();
    assert_eq!(&reply[..4], &[0, 5, 0, 5]);
    // The stalled transfer gives up after its retransmissions (200 ms × 2 + the last
    // wait), freeing the slot.
    let (retransmit, _) = recv(&stalled, WAIT).await.unwrap();
    assert_eq!(&retransmit[..4], &[0, 3, 0, 1], "DATA 1 again");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if tftp_get(tftp, "ipxe.efi", &[]).await.is_ok() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slot was never freed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_flooding_client_is_rate_limited_and_others_are_not() {
    let fixture = start("client_requests_per_s = 1\nclient_burst = 3").await;
    let services = &fixture.services;
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let request = dhcp_request(MessageType::Request, 9, "PXEClient", 0, None);
    for _ in 0..20 {
        client.send_to(&request, services.pxe_addr).await.unwrap();
    }
    let mut answered = 0;
    while recv(&client, QUIET).await.is_some() {
        answered += 1;
    }
    assert_eq!(answered, 3, "the burst, then nothing");
    assert!(PxeStats::get(&services.stats.dhcp_rate_limited) >= 17);
    assert_eq!(
        ask_pxe(services, 10, 0, None).await.as_deref(),
        Some("undionly.kpxe")
    );
}

/// Valid packets cut short, bit-flipped, padded past the limit, and pure noise, on every
/// port; between batches, good clients must still be served.
#[tokio::test]
async fn hundreds_of_malformed_packets_never_stop_the_service() {
    // No rate limit here: the point is the parser, and the flood comes from one socket.
    let fixture = start("client_requests_per_s = 0").await;
    let services = &fixture.services;
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let noisy = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let seeds = [
        dhcp_request(
            MessageType::Discover,
            20,
            "PXEClient:Arch:00007",
            7,
            Some(b"iPXE"),
        ),
        dhcp_request(MessageType::Request, 21, "HTTPClient:Arch:00016", 16, None),
        rrq("undionly.kpxe", &[("blksize", "1468"), ("tsize", "0")]),
    ];
    let mut sent = 0;
    for round in 0..8 {
        for _ in 0..60 {
            let seed = &seeds[rng.below(seeds.len())];
            let packet = match rng.below(5) {
                0 => {
                    let len = rng.below(seed.len());
                    seed[..len].to_vec()
                }
                1 => {
                    let mut packet = seed.clone();
                    for _ in 0..1 + rng.below(8) {
                        let at = rng.below(packet.len());
                        packet[at] ^= 1 << rng.below(8);
                    }
                    packet
                }
                2 => {
                    let mut packet = seed.clone();
                    let extra = PACKET_BYTES_MAX + rng.below(3000);
                    packet.extend(rng.bytes(extra));
                    packet
                }
                3 => {
                    // Options region overwritten with noise: bad lengths, unknown codes.
                    let mut packet = seed.clone();
                    let start = 240.min(packet.len());
                    let noise_len = packet.len() - start + rng.below(64);
                    let noise = rng.bytes(noise_len);
                    packet.truncate(start);
                    packet.extend(noise);
                    packet
                }
                _ => {
                    let len = rng.below(700);
                    rng.bytes(len)
                }
            };
            let port = [services.dhcp_addr, services.pxe_addr, services.tftp_addr][rng.below(3)];
            noisy.send_to(&packet, port).await.unwrap();
            sent += 1;
        }
        let mac = 100 + round as u8;
        assert_eq!(
            ask_pxe(services, mac, 9, None).await.as_deref(),
            Some("ipxe.efi"),
            "round {round}: a good PXE client after {sent} bad packets"
        );
        assert_eq!(
            tftp_get(services.tftp_addr, "ipxe.efi", &[("blksize", "512")])
                .await
                .unwrap(),
            b"efi",
            "round {round}: a good TFTP client"
        );
    }
    assert!(sent >= 480);
    assert!(
        PxeStats::get(&services.stats.dhcp_dropped) > 100,
        "most mangled DHCP packets were dropped"
    );
}
