//! Sans-IO TFTP, read-only: request parsing (RFC 1350 with the option extension of RFC
//! 2347: `blksize` RFC 2348, `tsize` and `timeout` RFC 2349), the safe mapping of a
//! requested name to a path under the root, and one transfer's state machine (lock-step
//! DATA/ACK, retransmission on timeout, block numbers rolling over past 65535), driven by
//! datagrams and `now` passed in. The tokio edge (`serve.rs`) owns sockets and files.
//!
//! Only what PXE ROMs need: no write requests (refused with "access violation"), no
//! `netascii` (refused: boot files are binary), no `windowsize`.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub const OP_RRQ: u16 = 1;
pub const OP_WRQ: u16 = 2;
pub const OP_DATA: u16 = 3;
pub const OP_ACK: u16 = 4;
pub const OP_ERROR: u16 = 5;
pub const OP_OACK: u16 = 6;

/// RFC 1350's block size, used when the client does not negotiate one.
pub const BLKSIZE_DEFAULT: u16 = 512;
/// RFC 2348's bounds on a negotiated block size.
pub const BLKSIZE_MIN: u16 = 8;
pub const BLKSIZE_RFC_MAX: u16 = 65464;
/// A request must fit in one 512-byte datagram (RFC 1350 and what every client sends).
pub const REQUEST_BYTES_MAX: usize = 512;
/// Longest file name accepted.
pub const FILENAME_BYTES_MAX: usize = 255;
/// Options accepted per request; more is a malformed request.
const OPTIONS_MAX: usize = 8;

/// TFTP error codes (RFC 1350 §5, RFC 2347).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    NotDefined = 0,
    FileNotFound = 1,
    AccessViolation = 2,
    IllegalOperation = 4,
    UnknownTid = 5,
}

pub fn error_packet(code: ErrorCode, message: &str) -> Vec<u8> {
    let mut packet = Vec::with_capacity(5 + message.len());
    packet.extend_from_slice(&OP_ERROR.to_be_bytes());
    packet.extend_from_slice(&(code as u16).to_be_bytes());
    packet.extend_from_slice(message.as_bytes());
    packet.push(0);
    packet
}

pub fn opcode(packet: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes([*packet.first()?, *packet.get(1)?]))
}

/// A parsed read request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadRequest {
    pub filename: String,
    /// Requested block size, when the client asked for one.
    pub blksize: Option<u16>,
    /// The client asked for the transfer size (its value, 0 in a read request, is ignored).
    pub tsize: bool,
    /// Requested retransmission timeout, seconds.
    pub timeout_s: Option<u8>,
}

/// Why a request is refused; the edge answers with [`RequestError::packet`] when it makes
/// sense to answer at all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestError {
    Malformed(&'static str),
    WriteRefused,
    ModeRefused(String),
    BadPath(String),
}

impl RequestError {
    pub fn packet(&self) -> Vec<u8> {
        match self {
            RequestError::Malformed(what) => error_packet(ErrorCode::IllegalOperation, what),
            RequestError::WriteRefused => {
                error_packet(ErrorCode::AccessViolation, "read-only server")
            }
            RequestError::ModeRefused(_) => {
                error_packet(ErrorCode::IllegalOperation, "only octet mode is served")
            }
            RequestError::BadPath(_) => error_packet(ErrorCode::FileNotFound, "file not found"),
        }
    }
}

impl std::fmt::Display for RequestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RequestError::Malformed(what) => write!(f, "malformed request: {what}"),
            RequestError::WriteRefused => write!(f, "write request refused (read-only)"),
            RequestError::ModeRefused(mode) => write!(f, "mode {mode:?} refused (octet only)"),
            RequestError::BadPath(why) => write!(f, "path refused: {why}"),
        }
    }
}

/// Splits NUL-terminated strings; the last must be terminated.
fn strings(body: &[u8]) -> Result<Vec<&str>, RequestError> {
    let Some(body) = body.strip_suffix(&[0]) else {
        return Err(RequestError::Malformed("request does not end in NUL"));
    };
    body.split(|&byte| byte == 0)
        .map(|part| std::str::from_utf8(part).map_err(|_| RequestError::Malformed("not UTF-8")))
        .collect()
}

pub fn parse_request(packet: &[u8]) -> Result<ReadRequest, RequestError> {
    if packet.len() > REQUEST_BYTES_MAX {
        return Err(RequestError::Malformed("request over 512 bytes"));
    }
    match opcode(packet) {
        Some(OP_RRQ) => {}
        Some(OP_WRQ) => return Err(RequestError::WriteRefused),
        _ => return Err(RequestError::Malformed("not a read request")),
    }
    let parts = strings(&packet[2..])?;
    let [filename, mode, options @ ..] = parts.as_slice() else {
        return Err(RequestError::Malformed("no file name or mode"));
    };
    if filename.is_empty() || filename.len() > FILENAME_BYTES_MAX {
        return Err(RequestError::Malformed("file name empty or over 255 bytes"));
    }
    if !mode.eq_ignore_ascii_case("octet") {
        return Err(RequestError::ModeRefused(mode.to_string()));
    }
    if options.len() % 2 != 0 || options.len() / 2 > OPTIONS_MAX {
        return Err(RequestError::Malformed(
            "options must come in name/value pairs, at most 8",
        ));
    }
    let mut request = ReadRequest {
        filename: filename.to_string(),
        blksize: None,
        tsize: false,
        timeout_s: None,
    };
    for pair in options.chunks(2) {
        let (name, value) = (pair[0], pair[1]);
        // Unknown or unparsable options are ignored, as RFC 2347 tells servers to.
        if name.eq_ignore_ascii_case("blksize") {
            request.blksize = value
                .parse::<u16>()
                .ok()
                .filter(|size| *size >= BLKSIZE_MIN);
        } else if name.eq_ignore_ascii_case("tsize") {
            request.tsize = true;
        } else if name.eq_ignore_ascii_case("timeout") {
            request.timeout_s = value.parse::<u8>().ok().filter(|s| *s >= 1);
        }
    }
    Ok(request)
}

/// Maps a requested name to a path under `root`, refusing anything that could leave it:
/// `..`, absolute roots after the leading slash PXE ROMs add, backslashes (a Windows
/// client's separator), NULs, hidden names, and characters outside a safe set. Symbolic
/// links are checked by the edge after resolving (`canonicalize` must stay under root).
pub fn resolve_path(root: &Path, filename: &str) -> Result<PathBuf, RequestError> {
    let bad = |why: &str| Err(RequestError::BadPath(format!("{filename:?}: {why}")));
    let relative = filename.trim_start_matches('/');
    if relative.is_empty() {
        return bad("empty");
    }
    if !relative
        .bytes()
        .all(|byte| byte.is_ascii_alphanumeric() || b"._-+/".contains(&byte))
    {
        return bad("characters outside A-Z a-z 0-9 . _ - + /");
    }
    let mut path = root.to_path_buf();
    for component in Path::new(relative).components() {
        match component {
            Component::Normal(name) if !name.to_string_lossy().starts_with('.') => path.push(name),
            Component::Normal(_) => return bad("hidden or dot-dot name"),
            Component::CurDir => {}
            _ => return bad("leaves the root"),
        }
    }
    if path == root {
        return bad("names the root itself");
    }
    Ok(path)
}

/// The server's limits for one transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransferLimits {
    pub blksize_max: u16,
    /// Retransmission interval when the client does not ask for one.
    pub timeout: Duration,
    /// Retransmissions of one packet before the transfer is abandoned.
    pub retries_max: u32,
    /// Wall-time bound on a whole transfer, however it progresses.
    pub transfer_time_max: Duration,
}

/// What the transfer wants done next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    Send(Vec<u8>),
    /// Nothing to send; wait for a datagram or the deadline.
    Wait,
    /// The last block was acknowledged.
    Finished,
    /// Given up: the reason, and the error packet to send the client, if any.
    Abort(String, Option<Vec<u8>>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// The OACK was sent; waiting for ACK 0.
    AwaitOackAck,
    /// Block `n` (1-based, not wrapped) was sent; waiting for its ACK.
    Sent(u64),
    Done,
}

/// One read transfer.
#[derive(Debug)]
pub struct Transfer {
    data: Arc<[u8]>,
    blksize: usize,
    blocks: u64,
    timeout: Duration,
    retries_max: u32,
    retries: u32,
    state: State,
    last_packet: Vec<u8>,
    last_sent: Duration,
    deadline: Duration,
}

impl Transfer {
    /// Starts a transfer of `data` for `request` at `now`; returns it with its first
    /// packet (an OACK when options were accepted, else DATA 1).
    pub fn start(
        data: Arc<[u8]>,
        request: &ReadRequest,
        limits: &TransferLimits,
        now: Duration,
    ) -> (Transfer, Vec<u8>) {
        let blksize = match request.blksize {
            Some(asked) => asked.min(limits.blksize_max).min(BLKSIZE_RFC_MAX),
            None => BLKSIZE_DEFAULT,
        };
        let timeout = request
            .timeout_s
            .map_or(limits.timeout, |s| Duration::from_secs(u64::from(s)));
        let mut oack = Vec::new();
        let mut option = |name: &str, value: String| {
            oack.extend_from_slice(name.as_bytes());
            oack.push(0);
            oack.extend_from_slice(value.as_bytes());
            oack.push(0);
        };
        if request.blksize.is_some() {
            option("blksize", blksize.to_string());
        }
        if request.tsize {
            option("tsize", data.len().to_string());
        }
        if let Some(seconds) = request.timeout_s {
            option("timeout", seconds.to_string());
        }
        let blksize = usize::from(blksize);
        let mut transfer = Transfer {
            blocks: data.len() as u64 / blksize as u64 + 1,
            data,
            blksize,
            timeout,
            retries_max: limits.retries_max,
            retries: 0,
            state: State::AwaitOackAck,
            last_packet: Vec::new(),
            last_sent: now,
            deadline: now + limits.transfer_time_max,
        };
        let first = if oack.is_empty() {
            transfer.data_packet(1)
        } else {
            let mut packet = OP_OACK.to_be_bytes().to_vec();
            packet.extend_from_slice(&oack);
            packet
        };
        if !oack.is_empty() {
            transfer.state = State::AwaitOackAck;
        }
        transfer.last_packet = first.clone();
        (transfer, first)
    }

    pub fn blksize(&self) -> usize {
        self.blksize
    }

    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    /// When the edge must call [`Transfer::on_timer`] if no datagram came first.
    pub fn next_deadline(&self) -> Duration {
        (self.last_sent + self.timeout).min(self.deadline)
    }

    fn data_packet(&mut self, block: u64) -> Vec<u8> {
        let start = ((block - 1) as usize)
            .saturating_mul(self.blksize)
            .min(self.data.len());
        let end = (start + self.blksize).min(self.data.len());
        let mut packet = Vec::with_capacity(4 + end - start);
        packet.extend_from_slice(&OP_DATA.to_be_bytes());
        // Block numbers wrap: block 65536 goes on the wire as 0 (what ROMs expect).
        packet.extend_from_slice(&((block % 65536) as u16).to_be_bytes());
        packet.extend_from_slice(&self.data[start..end]);
        self.state = State::Sent(block);
        packet
    }

    fn send(&mut self, packet: Vec<u8>, now: Duration) -> Step {
        self.last_packet = packet.clone();
        self.last_sent = now;
        self.retries = 0;
        Step::Send(packet)
    }

    /// A datagram from the client's address and port.
    pub fn on_datagram(&mut self, packet: &[u8], now: Duration) -> Step {
        if now >= self.deadline {
            return self.timed_out();
        }
        match opcode(packet) {
            Some(OP_ACK) if packet.len() >= 4 => {
                let acked = u16::from_be_bytes([packet[2], packet[3]]);
                match self.state {
                    State::AwaitOackAck if acked == 0 => {
                        let data = self.data_packet(1);
                        self.send(data, now)
                    }
                    State::Sent(block) if acked == (block % 65536) as u16 => {
                        if block >= self.blocks {
                            self.state = State::Done;
                            Step::Finished
                        } else {
                            let data = self.data_packet(block + 1);
                            self.send(data, now)
                        }
                    }
                    // A duplicate or stale ACK: never answered with a resend (that is the
                    // Sorcerer's Apprentice bug, RFC 1123 §4.2.3.1); the timer resends.
                    _ => Step::Wait,
                }
            }
            Some(OP_ERROR) => {
                // EDK2 asks for `tsize` and then aborts with an error, on purpose: not a
                // fault, just the end of this transfer.
                self.state = State::Done;
                Step::Abort("the client ended the transfer".into(), None)
            }
            _ => Step::Abort(
                "unexpected packet during a transfer".into(),
                Some(error_packet(ErrorCode::IllegalOperation, "expected an ACK")),
            ),
        }
    }

    /// The deadline from [`Transfer::next_deadline`] passed.
    pub fn on_timer(&mut self, now: Duration) -> Step {
        if now >= self.deadline {
            return self.timed_out();
        }
        if self.state == State::Done || now < self.last_sent + self.timeout {
            return Step::Wait;
        }
        if self.retries >= self.retries_max {
            return Step::Abort(
                format!("no ACK after {} retransmissions", self.retries_max),
                Some(error_packet(ErrorCode::NotDefined, "timed out")),
            );
        }
        self.retries += 1;
        self.last_sent = now;
        Step::Send(self.last_packet.clone())
    }

    fn timed_out(&mut self) -> Step {
        self.state = State::Done;
        Step::Abort(
            "transfer took longer than its time limit".into(),
            Some(error_packet(ErrorCode::NotDefined, "transfer time limit")),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rrq(parts: &[&str]) -> Vec<u8> {
        let mut packet = OP_RRQ.to_be_bytes().to_vec();
        for part in parts {
            packet.extend_from_slice(part.as_bytes());
            packet.push(0);
        }
        packet
    }

    fn ack(block: u16) -> Vec<u8> {
        let mut packet = OP_ACK.to_be_bytes().to_vec();
        packet.extend_from_slice(&block.to_be_bytes());
        packet
    }

    const LIMITS: TransferLimits = TransferLimits {
        blksize_max: 1468,
        timeout: Duration::from_secs(1),
        retries_max: 3,
        transfer_time_max: Duration::from_secs(60),
    };

    #[test]
    fn requests_parse_with_their_options() {
        assert_eq!(
            parse_request(&rrq(&["undionly.kpxe", "octet"])).unwrap(),
            ReadRequest {
                filename: "undionly.kpxe".into(),
                blksize: None,
                tsize: false,
                timeout_s: None
            }
        );
        assert_eq!(
            parse_request(&rrq(&[
                "/ipxe.efi",
                "OCTET",
                "tsize",
                "0",
                "BLKSIZE",
                "1468",
                "x-unknown",
                "1"
            ]))
            .unwrap(),
            ReadRequest {
                filename: "/ipxe.efi".into(),
                blksize: Some(1468),
                tsize: true,
                timeout_s: None
            }
        );
        let with = |option: &str, value: &str| {
            parse_request(&rrq(&["f", "octet", option, value])).unwrap()
        };
        assert_eq!(
            with("blksize", "7").blksize,
            None,
            "below RFC 2348's minimum is ignored"
        );
        assert_eq!(with("blksize", "99999").blksize, None, "not a u16");
        assert_eq!(with("timeout", "0").timeout_s, None);
        assert_eq!(with("timeout", "5").timeout_s, Some(5));
    }

    #[test]
    fn bad_requests_are_refused_with_the_right_error() {
        let refused = |packet: &[u8]| parse_request(packet).unwrap_err();
        assert_eq!(
            refused(&rrq(&["f", "netascii"])),
            RequestError::ModeRefused("netascii".into())
        );
        let mut wrq = rrq(&["f", "octet"]);
        wrq[1] = OP_WRQ as u8;
        assert_eq!(refused(&wrq), RequestError::WriteRefused);
        assert_eq!(opcode(&RequestError::WriteRefused.packet()), Some(OP_ERROR));
        assert!(matches!(
            refused(b"\x00\x01f\x00octet"),
            RequestError::Malformed(_)
        ));
        assert!(matches!(refused(b"\x00\x01"), RequestError::Malformed(_)));
        assert!(matches!(
            refused(&rrq(&["", "octet"])),
            RequestError::Malformed(_)
        ));
        assert!(matches!(
            refused(&rrq(&["f", "octet", "blksize"])),
            RequestError::Malformed(_)
        ));
        assert!(matches!(
            refused(&rrq(&[&"a".repeat(300), "octet"])),
            RequestError::Malformed(_)
        ));
        assert!(matches!(refused(&[0xff; 600]), RequestError::Malformed(_)));
        assert!(matches!(
            refused(b"\x00\x01\xff\xfe\x00octet\x00"),
            RequestError::Malformed(_)
        ));
    }

    #[test]
    fn paths_cannot_leave_the_root() {
        let root = Path::new("/srv/tftp");
        assert_eq!(
            resolve_path(root, "undionly.kpxe").unwrap(),
            root.join("undionly.kpxe")
        );
        assert_eq!(
            resolve_path(root, "/efi/ipxe.efi").unwrap(),
            root.join("efi/ipxe.efi")
        );
        assert_eq!(resolve_path(root, "./a/./b").unwrap(), root.join("a/b"));
        for evil in [
            "../etc/passwd",
            "/../etc/passwd",
            "a/../../etc/passwd",
            "..",
            "//",
            "/",
            ".",
            "a\\..\\b",
            ".hidden",
            "a/.ssh/id",
            "a b",
            "a\u{0}b",
            "%2e%2e/x",
            "a:b",
            "~root",
        ] {
            assert!(
                resolve_path(root, evil).is_err(),
                "{evil:?} must be refused"
            );
        }
    }

    fn data_of(packet: &[u8]) -> (u16, &[u8]) {
        assert_eq!(opcode(packet), Some(OP_DATA), "{packet:?}");
        (u16::from_be_bytes([packet[2], packet[3]]), &packet[4..])
    }

    /// Runs a whole transfer, acking every block; returns the bytes received.
    fn receive(transfer: &mut Transfer, first: Vec<u8>) -> Vec<u8> {
        let mut got = Vec::new();
        let mut packet = first;
        let now = Duration::from_secs(1);
        if opcode(&packet) == Some(OP_OACK) {
            packet = match transfer.on_datagram(&ack(0), now) {
                Step::Send(packet) => packet,
                other => panic!("{other:?}"),
            };
        }
        loop {
            let (block, data) = data_of(&packet);
            got.extend_from_slice(data);
            match transfer.on_datagram(&ack(block), now) {
                Step::Send(next) => packet = next,
                Step::Finished => return got,
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn a_file_arrives_whole_with_and_without_options() {
        let data: Arc<[u8]> = (0..5000u32).map(|i| i as u8).collect::<Vec<_>>().into();
        let plain = ReadRequest {
            filename: "f".into(),
            blksize: None,
            tsize: false,
            timeout_s: None,
        };
        let (mut transfer, first) = Transfer::start(data.clone(), &plain, &LIMITS, Duration::ZERO);
        assert_eq!(
            opcode(&first),
            Some(OP_DATA),
            "no options: DATA 1 straight away"
        );
        assert_eq!(receive(&mut transfer, first), &data[..]);

        let options = ReadRequest {
            blksize: Some(9000),
            tsize: true,
            ..plain.clone()
        };
        let (mut transfer, first) =
            Transfer::start(data.clone(), &options, &LIMITS, Duration::ZERO);
        assert_eq!(
            first, b"\x00\x06blksize\x001468\x00tsize\x005000\x00",
            "blksize capped at the limit"
        );
        assert_eq!(transfer.blksize(), 1468);
        assert_eq!(receive(&mut transfer, first), &data[..]);

        // A size that is a multiple of the block size ends with an empty block.
        let even: Arc<[u8]> = vec![7u8; 1024].into();
        let (mut transfer, first) = Transfer::start(even.clone(), &plain, &LIMITS, Duration::ZERO);
        assert_eq!(receive(&mut transfer, first).len(), 1024);
        assert_eq!(transfer.blocks, 3);
    }

    #[test]
    fn block_numbers_roll_over_past_65535() {
        let data: Arc<[u8]> = vec![1u8; 8 * 65_537].into();
        let request = ReadRequest {
            filename: "f".into(),
            blksize: Some(8),
            tsize: false,
            timeout_s: None,
        };
        let (mut transfer, first) =
            Transfer::start(data.clone(), &request, &LIMITS, Duration::ZERO);
        assert_eq!(receive(&mut transfer, first).len(), data.len());
    }

    #[test]
    fn lost_packets_are_resent_on_the_timer_and_duplicates_are_not_answered() {
        let data: Arc<[u8]> = vec![0u8; 2000].into();
        let request = ReadRequest {
            filename: "f".into(),
            blksize: None,
            tsize: false,
            timeout_s: None,
        };
        let t0 = Duration::from_secs(10);
        let (mut transfer, first) = Transfer::start(data, &request, &LIMITS, t0);
        assert_eq!(transfer.next_deadline(), t0 + Duration::from_secs(1));
        assert_eq!(
            transfer.on_timer(t0 + Duration::from_millis(500)),
            Step::Wait,
            "not yet"
        );
        assert_eq!(
            transfer.on_timer(t0 + Duration::from_secs(1)),
            Step::Send(first.clone())
        );
        let Step::Send(second) = transfer.on_datagram(&ack(1), t0 + Duration::from_secs(2)) else {
            panic!()
        };
        assert_eq!(data_of(&second).0, 2);
        assert_eq!(
            transfer.on_datagram(&ack(1), t0 + Duration::from_secs(2)),
            Step::Wait
        );
        let mut now = t0 + Duration::from_secs(2);
        for _ in 0..LIMITS.retries_max {
            now += Duration::from_secs(1);
            assert_eq!(transfer.on_timer(now), Step::Send(second.clone()));
        }
        now += Duration::from_secs(1);
        assert!(
            matches!(transfer.on_timer(now), Step::Abort(reason, Some(_)) if reason.contains("3 retransmissions"))
        );
    }

    #[test]
    fn a_client_error_ends_quietly_and_the_time_limit_ends_anything() {
        let data: Arc<[u8]> = vec![0u8; 100].into();
        let request = ReadRequest {
            filename: "f".into(),
            blksize: None,
            tsize: true,
            timeout_s: Some(2),
        };
        let (mut transfer, _) = Transfer::start(data.clone(), &request, &LIMITS, Duration::ZERO);
        assert_eq!(
            transfer.next_deadline(),
            Duration::from_secs(2),
            "the client's timeout is used"
        );
        let abort = transfer.on_datagram(
            &error_packet(ErrorCode::NotDefined, "tsize probe"),
            Duration::ZERO,
        );
        assert!(matches!(abort, Step::Abort(_, None)));

        let (mut slow, _) = Transfer::start(data, &request, &LIMITS, Duration::ZERO);
        let late = LIMITS.transfer_time_max;
        assert!(
            matches!(slow.on_datagram(&ack(0), late), Step::Abort(reason, Some(_)) if reason.contains("time limit"))
        );
    }

    #[test]
    fn garbage_during_a_transfer_aborts_it_with_an_error() {
        let data: Arc<[u8]> = vec![0u8; 100].into();
        let request = ReadRequest {
            filename: "f".into(),
            blksize: None,
            tsize: false,
            timeout_s: None,
        };
        let (mut transfer, _) = Transfer::start(data, &request, &LIMITS, Duration::ZERO);
        assert!(matches!(
            transfer.on_datagram(b"\x00", Duration::ZERO),
            Step::Abort(_, Some(_))
        ));
        let (mut transfer, _) =
            Transfer::start(vec![0u8; 10].into(), &request, &LIMITS, Duration::ZERO);
        assert_eq!(
            transfer.on_datagram(b"\x00\x04\x00", Duration::ZERO),
            Step::Abort(
                "unexpected packet during a transfer".into(),
                Some(error_packet(ErrorCode::IllegalOperation, "expected an ACK"))
            ),
            "a truncated ACK"
        );
    }
}
