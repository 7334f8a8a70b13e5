//! Sans-IO proxyDHCP (PXE spec 2.1 §2.2.3, as Tinkerbell smee and dnsmasq's proxy mode do
//! it): a datagram in, at most one datagram out. Bearman never hands out an address — the
//! site's DHCP server does that — it only tells network-boot clients what to boot:
//!
//! - a `DHCPDISCOVER` on port 67 from a PXE/HTTP-boot client gets a proxy `DHCPOFFER`
//!   (yiaddr 0.0.0.0) with the boot file or URL, our address as next-server and server
//!   identifier, option 60 echoing the client's kind, option 97 echoing its UUID, and for
//!   PXE option 43 with discovery control 8 (boot the offered file, no boot-server
//!   discovery);
//! - a `DHCPREQUEST` or `DHCPINFORM` on port 4011 (the PXE boot-server port, where
//!   EDK2 and iPXE ask a proxy for its answer after their address is bound) gets a
//!   `DHCPACK` with the same, sent back to the port it came from.
//!
//! Everything else is dropped with a reason the caller logs (rate-limited). The wire
//! format is `dhcproto`'s.

use std::net::{Ipv4Addr, SocketAddrV4};

use dhcproto::v4::{DhcpOption, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};

use crate::boot::{self, BootAnswer, BootTargets, ClientFacts, NoAnswer};

/// The largest datagram accepted. DHCP messages fit in 576 bytes unless a client asks for
/// more (option 57); 1500 covers every real client on an Ethernet MTU. Larger ones are
/// dropped unread.
pub const PACKET_BYTES_MAX: usize = 1500;
/// The fixed BOOTP header plus the magic cookie: nothing shorter is DHCP.
pub const PACKET_BYTES_MIN: usize = 240;
/// The BOOTP `file` field holds 127 bytes and a NUL; a longer boot file goes only in
/// option 67.
const FILE_FIELD_BYTES_MAX: usize = 127;

/// Which of the two ports a request came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Port {
    /// 67, broadcast, shared with the site's DHCP server.
    Dhcp,
    /// 4011, unicast to us.
    PxeBoot,
}

/// Where a reply goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Destination {
    /// 255.255.255.255:68: the client has no address yet.
    Broadcast,
    Unicast(SocketAddrV4),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub bytes: Vec<u8>,
    pub to: Destination,
    pub answer: BootAnswer,
    pub message_type: MessageType,
    /// The client's hardware address, as text, for logs.
    pub client: String,
}

/// Why a datagram got no reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dropped {
    TooShort(usize),
    TooLarge(usize),
    Malformed(String),
    NotARequest,
    /// A message type this port does not answer (e.g. a DHCPREQUEST on 67, which is the
    /// site server's business).
    NotOurs {
        message_type: Option<MessageType>,
        port: Port,
    },
    NoAnswer(NoAnswer),
}

impl Dropped {
    /// Worth a warning (a broken or hostile sender), or ordinary traffic on a shared port.
    pub fn is_bad_packet(&self) -> bool {
        matches!(
            self,
            Dropped::TooShort(_)
                | Dropped::TooLarge(_)
                | Dropped::Malformed(_)
                | Dropped::NotARequest
        )
    }
}

impl std::fmt::Display for Dropped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dropped::TooShort(len) => write!(f, "{len} bytes is shorter than a DHCP header"),
            Dropped::TooLarge(len) => {
                write!(f, "{len} bytes is over the {PACKET_BYTES_MAX}-byte limit")
            }
            Dropped::Malformed(error) => write!(f, "malformed DHCP message: {error}"),
            Dropped::NotARequest => write!(f, "not a BOOTREQUEST"),
            Dropped::NotOurs { message_type, port } => {
                write!(f, "{message_type:?} on {port:?} is not answered by a proxy")
            }
            Dropped::NoAnswer(reason) => write!(f, "{reason}"),
        }
    }
}

/// The proxyDHCP answerer: where clients are sent and our own address.
#[derive(Clone, Debug)]
pub struct ProxyDhcp {
    pub targets: BootTargets,
    /// Our address on the boot network: server identifier and next-server (TFTP).
    pub server: Ipv4Addr,
}

/// What a request says about its client, read from a decoded message.
pub fn client_facts(message: &Message) -> ClientFacts {
    let bytes = |code| match message.opts().get(code) {
        Some(DhcpOption::ClassIdentifier(bytes)) | Some(DhcpOption::UserClass(bytes)) => {
            Some(bytes.clone())
        }
        _ => None,
    };
    let arch = match message.opts().get(OptionCode::ClientSystemArchitecture) {
        Some(DhcpOption::ClientSystemArchitecture(arch)) => Some(u16::from(*arch)),
        _ => None,
    };
    ClientFacts {
        vendor_class: bytes(OptionCode::ClassIdentifier),
        arch,
        user_class: bytes(OptionCode::UserClass),
    }
}

pub fn mac_text(chaddr: &[u8]) -> String {
    chaddr
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl ProxyDhcp {
    /// Decodes one datagram from `from` on `port` and builds the reply, if any.
    pub fn handle(&self, packet: &[u8], from: SocketAddrV4, port: Port) -> Result<Reply, Dropped> {
        if packet.len() > PACKET_BYTES_MAX {
            return Err(Dropped::TooLarge(packet.len()));
        }
        if packet.len() < PACKET_BYTES_MIN {
            return Err(Dropped::TooShort(packet.len()));
        }
        // dhcproto does not check the magic cookie (99.130.83.99); BOOTP without it is not
        // a DHCP client.
        if packet[236..240] != dhcproto::v4::MAGIC {
            return Err(Dropped::Malformed("no DHCP magic cookie".into()));
        }
        let request = Message::decode(&mut Decoder::new(packet))
            .map_err(|error| Dropped::Malformed(error.to_string()))?;
        if request.opcode() != Opcode::BootRequest {
            return Err(Dropped::NotARequest);
        }
        let message_type = request.opts().msg_type();
        let reply_type = match (port, message_type) {
            (Port::Dhcp, Some(MessageType::Discover)) => MessageType::Offer,
            (Port::PxeBoot, Some(MessageType::Request | MessageType::Inform)) => MessageType::Ack,
            (port, message_type) => return Err(Dropped::NotOurs { message_type, port }),
        };
        let answer =
            boot::decide(&client_facts(&request), &self.targets).map_err(Dropped::NoAnswer)?;
        let bytes = self
            .build(&request, reply_type, &answer)
            .map_err(|error| Dropped::Malformed(format!("cannot encode the reply: {error}")))?;
        let to = match port {
            Port::PxeBoot => Destination::Unicast(from),
            Port::Dhcp if !request.giaddr().is_unspecified() => {
                Destination::Unicast(SocketAddrV4::new(request.giaddr(), 67))
            }
            Port::Dhcp if !request.ciaddr().is_unspecified() => {
                Destination::Unicast(SocketAddrV4::new(request.ciaddr(), 68))
            }
            Port::Dhcp => Destination::Broadcast,
        };
        Ok(Reply {
            bytes,
            to,
            answer,
            message_type: reply_type,
            client: mac_text(request.chaddr()),
        })
    }

    fn build(
        &self,
        request: &Message,
        reply_type: MessageType,
        answer: &BootAnswer,
    ) -> Result<Vec<u8>, dhcproto::error::EncodeError> {
        let mut reply = Message::default();
        reply
            .set_opcode(Opcode::BootReply)
            .set_htype(request.htype())
            .set_xid(request.xid())
            .set_flags(request.flags())
            .set_ciaddr(request.ciaddr())
            .set_yiaddr(Ipv4Addr::UNSPECIFIED)
            .set_siaddr(self.server)
            .set_giaddr(request.giaddr())
            .set_chaddr(request.chaddr());
        let (file, class): (&str, &[u8]) = match answer {
            BootAnswer::Tftp(file) => (file, b"PXEClient"),
            BootAnswer::IpxeScript(url) => (url, b"PXEClient"),
            BootAnswer::HttpBoot(url) => (url, b"HTTPClient"),
        };
        if file.len() <= FILE_FIELD_BYTES_MAX {
            reply.set_fname_str(file);
        }
        reply.set_sname_str(self.server.to_string());
        let opts = reply.opts_mut();
        opts.insert(DhcpOption::MessageType(reply_type));
        opts.insert(DhcpOption::ServerIdentifier(self.server));
        opts.insert(DhcpOption::ClassIdentifier(class.to_vec()));
        opts.insert(DhcpOption::BootfileName(file.as_bytes().to_vec()));
        if let Some(DhcpOption::ClientMachineIdentifier(uuid)) =
            request.opts().get(OptionCode::ClientMachineIdentifier)
        {
            opts.insert(DhcpOption::ClientMachineIdentifier(uuid.clone()));
        }
        if matches!(answer, BootAnswer::Tftp(_) | BootAnswer::IpxeScript(_)) {
            // PXE vendor options: PXE_DISCOVERY_CONTROL (6) = 8: "boot the file named in
            // this offer", so ROMs skip boot-server discovery and menus; then END.
            opts.insert(DhcpOption::VendorExtensions(vec![6, 1, 8, 255]));
        }
        let mut bytes = Vec::with_capacity(512);
        reply.encode(&mut Encoder::new(&mut bytes))?;
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dhcproto::v4::Architecture;

    pub(crate) fn proxy() -> ProxyDhcp {
        ProxyDhcp {
            targets: BootTargets {
                bios_file: "undionly.kpxe".into(),
                uefi_file: "ipxe.efi".into(),
                http_boot_url: "http://10.77.0.1:8080/images/ipxe.efi".into(),
                ipxe_url: "http://10.77.0.1:8080/ipxe".into(),
            },
            server: Ipv4Addr::new(10, 77, 0, 1),
        }
    }

    fn request(
        kind: MessageType,
        class: Option<&str>,
        arch: Option<u16>,
        user: Option<&[u8]>,
    ) -> Vec<u8> {
        let mut message = Message::default();
        message
            .set_xid(0x1234_5678)
            .set_chaddr(&[0x52, 0x54, 0, 0xbe, 0xa0, 1]);
        let opts = message.opts_mut();
        opts.insert(DhcpOption::MessageType(kind));
        if let Some(class) = class {
            opts.insert(DhcpOption::ClassIdentifier(class.as_bytes().to_vec()));
        }
        if let Some(arch) = arch {
            opts.insert(DhcpOption::ClientSystemArchitecture(Architecture::from(
                arch,
            )));
        }
        if let Some(user) = user {
            opts.insert(DhcpOption::UserClass(user.to_vec()));
        }
        opts.insert(DhcpOption::ClientMachineIdentifier(vec![0; 17]));
        let mut bytes = Vec::new();
        message.encode(&mut Encoder::new(&mut bytes)).unwrap();
        bytes
    }

    /// The `file` field without the NUL dhcproto keeps.
    fn file_of(message: &Message) -> String {
        let file = message.fname_str().unwrap().unwrap();
        file.trim_end_matches('\0').to_string()
    }

    fn decode(bytes: &[u8]) -> Message {
        Message::decode(&mut Decoder::new(bytes)).unwrap()
    }

    const CLIENT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 68);

    #[test]
    fn a_bios_discover_gets_a_proxy_offer_with_the_bios_file_and_no_address() {
        let packet = request(
            MessageType::Discover,
            Some("PXEClient:Arch:00000:UNDI:002001"),
            Some(0),
            None,
        );
        let reply = proxy().handle(&packet, CLIENT, Port::Dhcp).unwrap();
        assert_eq!(reply.to, Destination::Broadcast);
        assert_eq!(reply.client, "52:54:00:be:a0:01");
        let offer = decode(&reply.bytes);
        assert_eq!(offer.opcode(), Opcode::BootReply);
        assert_eq!(offer.xid(), 0x1234_5678);
        assert_eq!(
            offer.yiaddr(),
            Ipv4Addr::UNSPECIFIED,
            "a proxy never offers an address"
        );
        assert_eq!(offer.siaddr(), Ipv4Addr::new(10, 77, 0, 1));
        assert_eq!(file_of(&offer), "undionly.kpxe");
        assert_eq!(offer.opts().msg_type(), Some(MessageType::Offer));
        assert_eq!(
            offer.opts().get(OptionCode::ClassIdentifier),
            Some(&DhcpOption::ClassIdentifier(b"PXEClient".to_vec()))
        );
        assert_eq!(
            offer.opts().get(OptionCode::ServerIdentifier),
            Some(&DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 77, 0, 1)))
        );
        assert_eq!(
            offer.opts().get(OptionCode::VendorExtensions),
            Some(&DhcpOption::VendorExtensions(vec![6, 1, 8, 255]))
        );
        assert!(
            offer
                .opts()
                .get(OptionCode::ClientMachineIdentifier)
                .is_some(),
            "UUID echoed"
        );
        for absent in [
            OptionCode::SubnetMask,
            OptionCode::Router,
            OptionCode::AddressLeaseTime,
        ] {
            assert!(
                offer.opts().get(absent).is_none(),
                "{absent:?} is the site server's"
            );
        }
    }

    #[test]
    fn port_4011_requests_get_an_ack_sent_back_where_they_came_from() {
        let from = SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 123), 68);
        let packet = request(
            MessageType::Request,
            Some("PXEClient:Arch:00007:UNDI:003000"),
            Some(7),
            None,
        );
        let reply = proxy().handle(&packet, from, Port::PxeBoot).unwrap();
        assert_eq!(reply.to, Destination::Unicast(from));
        assert_eq!(reply.message_type, MessageType::Ack);
        assert_eq!(file_of(&decode(&reply.bytes)), "ipxe.efi");
    }

    #[test]
    fn ipxe_gets_the_script_url_and_http_boot_a_url_with_its_class() {
        let packet = request(
            MessageType::Discover,
            Some("PXEClient:Arch:00007"),
            Some(7),
            Some(b"iPXE"),
        );
        let reply = proxy().handle(&packet, CLIENT, Port::Dhcp).unwrap();
        assert_eq!(file_of(&decode(&reply.bytes)), "http://10.77.0.1:8080/ipxe");

        let packet = request(
            MessageType::Discover,
            Some("HTTPClient:Arch:00016:UNDI:003001"),
            Some(16),
            None,
        );
        let offer = decode(&proxy().handle(&packet, CLIENT, Port::Dhcp).unwrap().bytes);
        assert_eq!(
            offer.opts().get(OptionCode::ClassIdentifier),
            Some(&DhcpOption::ClassIdentifier(b"HTTPClient".to_vec()))
        );
        assert!(offer.opts().get(OptionCode::VendorExtensions).is_none());
    }

    #[test]
    fn a_long_url_goes_in_option_67_only() {
        let mut proxy = proxy();
        proxy.targets.ipxe_url = format!("http://boot.example/{}", "x".repeat(200));
        let packet = request(
            MessageType::Discover,
            Some("PXEClient"),
            Some(0),
            Some(b"iPXE"),
        );
        let offer = decode(&proxy.handle(&packet, CLIENT, Port::Dhcp).unwrap().bytes);
        assert!(offer.fname().is_none());
        assert_eq!(
            offer.opts().get(OptionCode::BootfileName),
            Some(&DhcpOption::BootfileName(
                proxy.targets.ipxe_url.as_bytes().to_vec()
            ))
        );
    }

    #[test]
    fn what_a_proxy_must_not_answer_is_dropped_with_a_reason() {
        let proxy = proxy();
        let plain = request(MessageType::Discover, Some("udhcp 1.36.1"), None, None);
        assert_eq!(
            proxy.handle(&plain, CLIENT, Port::Dhcp),
            Err(Dropped::NoAnswer(NoAnswer::NotNetboot))
        );
        let req67 = request(MessageType::Request, Some("PXEClient"), Some(0), None);
        assert!(matches!(
            proxy.handle(&req67, CLIENT, Port::Dhcp),
            Err(Dropped::NotOurs { .. })
        ));
        let disc4011 = request(MessageType::Discover, Some("PXEClient"), Some(0), None);
        assert!(matches!(
            proxy.handle(&disc4011, CLIENT, Port::PxeBoot),
            Err(Dropped::NotOurs { .. })
        ));
        assert_eq!(
            proxy.handle(&[0; 10], CLIENT, Port::Dhcp),
            Err(Dropped::TooShort(10))
        );
        assert_eq!(
            proxy.handle(&vec![0; 2000], CLIENT, Port::Dhcp),
            Err(Dropped::TooLarge(2000))
        );
        let mut reply_op = request(MessageType::Discover, Some("PXEClient"), Some(0), None);
        reply_op[0] = 2;
        assert_eq!(
            proxy.handle(&reply_op, CLIENT, Port::Dhcp),
            Err(Dropped::NotARequest)
        );
        let mut no_cookie = request(MessageType::Discover, Some("PXEClient"), Some(0), None);
        no_cookie[236] ^= 0xff;
        assert!(matches!(
            proxy.handle(&no_cookie, CLIENT, Port::Dhcp),
            Err(Dropped::Malformed(_))
        ));
    }

    #[test]
    fn relayed_and_bound_clients_are_answered_by_unicast() {
        let mut message = decode(&request(
            MessageType::Discover,
            Some("PXEClient"),
            Some(0),
            None,
        ));
        message.set_giaddr(Ipv4Addr::new(10, 1, 0, 1));
        let mut bytes = Vec::new();
        message.encode(&mut Encoder::new(&mut bytes)).unwrap();
        let reply = proxy().handle(&bytes, CLIENT, Port::Dhcp).unwrap();
        assert_eq!(
            reply.to,
            Destination::Unicast(SocketAddrV4::new(Ipv4Addr::new(10, 1, 0, 1), 67))
        );
    }
}
