//! Hearing LLDP on the wire: one `AF_PACKET` raw socket per NIC, bound to that interface
//! and ethertype 0x88cc, waited on concurrently for a bounded time; the first frame that
//! parses ([`crate::lldp::parse_frame`]) is the NIC's neighbour.
//!
//! Never fatal: a NIC whose socket cannot be opened (not root, no such interface) or that
//! hears nothing in time gives an [`Outcome`] saying so, and registration goes on without
//! its neighbour.

use std::ffi::{c_int, c_void, CString};
use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use bearman_proto::LldpNeighbor;
use tokio::io::unix::AsyncFd;

pub use crate::lldp::{NicLldp, Outcome};

use crate::lldp::{self, LldpError, ETHERTYPE_LLDP, FRAME_BYTES_MAX};

/// The nearest-bridge LLDP group address switches send to (IEEE 802.1AB).
pub const LLDP_MULTICAST: [u8; 6] = [0x01, 0x80, 0xc2, 0x00, 0x00, 0x0e];
/// Frames read per NIC at most: a port flooding bad LLDP frames cannot keep a listener busy.
pub const FRAMES_PER_NIC_MAX: usize = 64;
/// Interface names are at most this long (`IFNAMSIZ` less the NUL).
const IFNAME_BYTES_MAX: usize = libc::IFNAMSIZ - 1;

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("{nic:?} is not an interface name")]
    BadName { nic: String },
    #[error("no such interface {nic}")]
    NoSuchInterface { nic: String },
    #[error("opening a raw socket on {nic} is not permitted (needs root or CAP_NET_RAW)")]
    NotPermitted { nic: String },
    #[error("opening a raw socket on {nic}: {source}")]
    Socket { nic: String, source: io::Error },
    #[error("binding the raw socket to {nic}: {source}")]
    Bind { nic: String, source: io::Error },
    #[error("bringing {nic} up: {source}")]
    LinkUp { nic: String, source: io::Error },
    #[error("receiving on {nic}: {source}")]
    Receive { nic: String, source: io::Error },
}

/// Listens on every NIC in `nics` at once for at most `wait`; outcomes in `nics`' order.
pub async fn listen_all(nics: &[String], wait: Duration) -> Vec<NicLldp> {
    let tasks: Vec<_> = nics
        .iter()
        .map(|nic| {
            let nic = nic.clone();
            tokio::spawn(async move { listen(&nic, wait).await })
        })
        .collect();
    let mut outcomes = Vec::with_capacity(tasks.len());
    for (nic, task) in nics.iter().zip(tasks) {
        let outcome = task
            .await
            .unwrap_or_else(|error| Outcome::Failed(format!("listener on {nic}: {error}")));
        outcomes.push(NicLldp {
            nic: nic.clone(),
            outcome,
        });
    }
    outcomes
}

/// Listens on `nic` until the first frame that parses, at most `wait`.
pub async fn listen(nic: &str, wait: Duration) -> Outcome {
    let socket = match LldpSocket::open(nic) {
        Ok(socket) => socket,
        Err(error) => return Outcome::Failed(error.to_string()),
    };
    let mut refused: Option<String> = None;
    let mut buffer = vec![0u8; FRAME_BYTES_MAX];
    let hear = async {
        for _ in 0..FRAMES_PER_NIC_MAX {
            let len = socket.next_frame(&mut buffer).await?;
            let parsed = if len > buffer.len() {
                Err(LldpError::TooLarge { len })
            } else {
                lldp::parse_frame(&buffer[..len])
            };
            match parsed {
                Ok(neighbor) => return Ok(Some(neighbor)),
                Err(error) => refused = Some(error.to_string()),
            }
        }
        Ok(None)
    };
    let heard: Result<Result<Option<LldpNeighbor>, ListenError>, _> =
        tokio::time::timeout(wait, hear).await;
    match heard {
        Ok(Ok(Some(neighbor))) => Outcome::Heard(neighbor),
        Ok(Ok(None)) => Outcome::Failed(format!(
            "{FRAMES_PER_NIC_MAX} frames on {nic}, none a valid LLDP frame (last: {})",
            refused.unwrap_or_default()
        )),
        Ok(Err(error)) => Outcome::Failed(error.to_string()),
        Err(_) => Outcome::Silent { wait, refused },
    }
}

/// An `AF_PACKET` socket receiving the LLDP frames of one interface.
pub struct LldpSocket {
    nic: String,
    fd: AsyncFd<OwnedFd>,
}

impl LldpSocket {
    /// Opens the socket on `nic`, joins the LLDP multicast group there (so the NIC's
    /// filter passes the frames without promiscuous mode) and brings the link up if it is
    /// down (the init script only brings up the NIC it runs DHCP on).
    pub fn open(nic: &str) -> Result<LldpSocket, ListenError> {
        let bad_name = || ListenError::BadName {
            nic: nic.to_string(),
        };
        if nic.is_empty() || nic.len() > IFNAME_BYTES_MAX {
            return Err(bad_name());
        }
        let name = CString::new(nic).map_err(|_| bad_name())?;
        // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            return Err(ListenError::NoSuchInterface {
                nic: nic.to_string(),
            });
        }
        let protocol = ETHERTYPE_LLDP.to_be();
        // SAFETY: plain socket(2) call; the result is checked before use.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                c_int::from(protocol),
            )
        };
        if raw < 0 {
            let source = io::Error::last_os_error();
            return Err(match source.raw_os_error() {
                Some(libc::EPERM | libc::EACCES) => ListenError::NotPermitted {
                    nic: nic.to_string(),
                },
                _ => ListenError::Socket {
                    nic: nic.to_string(),
                    source,
                },
            });
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let ifindex = c_int::try_from(ifindex).map_err(|_| bad_name())?;

        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
        let mut address: libc::sockaddr_ll = unsafe { mem::zeroed() };
        address.sll_family = libc::AF_PACKET as u16;
        address.sll_protocol = protocol;
        address.sll_ifindex = ifindex;
        // SAFETY: `address` outlives the call and the length is its size.
        let bound = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&address as *const libc::sockaddr_ll).cast(),
                mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if bound < 0 {
            return Err(ListenError::Bind {
                nic: nic.to_string(),
                source: io::Error::last_os_error(),
            });
        }

        // SAFETY: packet_mreq is plain data; all-zero is a valid value.
        let mut membership: libc::packet_mreq = unsafe { mem::zeroed() };
        membership.mr_ifindex = ifindex;
        membership.mr_type = libc::PACKET_MR_MULTICAST as u16;
        membership.mr_alen = LLDP_MULTICAST.len() as u16;
        membership.mr_address[..LLDP_MULTICAST.len()].copy_from_slice(&LLDP_MULTICAST);
        // Best effort: a NIC that refuses the group may still pass the frames (many
        // deliver 01:80:c2:00:00:0e anyway, and veth has no filter), so listening goes on.
        // SAFETY: `membership` outlives the call and the length is its size.
        let _ = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_ADD_MEMBERSHIP,
                (&membership as *const libc::packet_mreq).cast::<c_void>(),
                mem::size_of::<libc::packet_mreq>() as libc::socklen_t,
            )
        };

        bring_up(fd.as_raw_fd(), &name).map_err(|source| ListenError::LinkUp {
            nic: nic.to_string(),
            source,
        })?;

        // SAFETY: the `OwnedFd` moves into the `AsyncFd`, which owns it until it is dropped;
        // nothing else can close or replace the descriptor meanwhile.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(|source| ListenError::Socket {
            nic: nic.to_string(),
            source: source.into(),
        })?;
        Ok(LldpSocket {
            nic: nic.to_string(),
            fd,
        })
    }

    /// Waits for the next frame received on the interface (frames this host sends are
    /// skipped) and copies it into `buffer`. Returns the frame's real length, which is
    /// larger than `buffer` when the frame was cut.
    pub async fn next_frame(&self, buffer: &mut [u8]) -> Result<usize, ListenError> {
        let receive_error = |source| ListenError::Receive {
            nic: self.nic.clone(),
            source,
        };
        loop {
            let mut ready = self.fd.readable().await.map_err(receive_error)?;
            match ready.try_io(|fd| receive(fd.as_raw_fd(), buffer)) {
                Ok(Ok((_, kind))) if kind == libc::PACKET_OUTGOING => continue,
                Ok(Ok((len, _))) => return Ok(len),
                Ok(Err(error)) => return Err(receive_error(error)),
                // Spurious readiness: wait again.
                Err(_would_block) => continue,
            }
        }
    }
}

/// One `recvfrom(2)`: the frame's real length (`MSG_TRUNC`) and its packet type.
fn receive(fd: RawFd, buffer: &mut [u8]) -> io::Result<(usize, u8)> {
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
    let mut from: libc::sockaddr_ll = unsafe { mem::zeroed() };
    let mut from_len = mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
    // SAFETY: `buffer` and `from` are valid for writes of the lengths passed.
    let received = unsafe {
        libc::recvfrom(
            fd,
            buffer.as_mut_ptr().cast(),
            buffer.len(),
            libc::MSG_TRUNC,
            (&mut from as *mut libc::sockaddr_ll).cast(),
            &mut from_len,
        )
    };
    if received < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((received as usize, from.sll_pkttype))
}

/// Sets `IFF_UP` on the interface when it is not set.
fn bring_up(fd: RawFd, name: &CString) -> io::Result<()> {
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut request: libc::ifreq = unsafe { mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(name.as_bytes()) {
        *slot = *byte as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the name and writes the flags of `request`.
    if unsafe { libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut request) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    let flags = unsafe { request.ifr_ifru.ifru_flags };
    if flags & libc::IFF_UP as libc::c_short != 0 {
        return Ok(());
    }
    request.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    // SAFETY: SIOCSIFFLAGS reads the name and flags of `request`.
    if unsafe { libc::ioctl(fd, libc::SIOCSIFFLAGS, &request) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_missing_interface_is_an_outcome_not_a_panic() {
        let outcome = listen("bmnosuch0", Duration::from_millis(10)).await;
        // Root sees "no such interface"; an unprivileged run may too (the name is looked
        // up first). Either way it is a Failed outcome naming the interface.
        assert_eq!(
            outcome,
            Outcome::Failed("no such interface bmnosuch0".into())
        );
        assert_eq!(
            listen("a-name-longer-than-15", Duration::from_millis(10)).await,
            Outcome::Failed("\"a-name-longer-than-15\" is not an interface name".into())
        );
    }
}
