//! LLDP frames parsed into neighbours: switch captures from fixtures/lldp/, hand-built
//! frames for each subtype, and garbage (truncated frames, wrong ethertype, zero-length
//! and oversized TLVs, non-UTF-8 text) that must give an error naming what was wrong.

use std::path::Path;

use bearman_agent::lldp::{parse_frame, LldpError, FRAME_BYTES_MAX};
use bearman_proto::LldpNeighbor;

const SWITCH_MAC: [u8; 6] = [0x2c, 0x6b, 0xf5, 0x9a, 0x3b, 0xc0];

/// A fixture frame: hex bytes, whitespace between them, `#` comments.
fn capture(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/lldp")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap();
    text.lines()
        .map(|line| line.split('#').next().unwrap())
        .flat_map(str::split_whitespace)
        .map(|byte| u8::from_str_radix(byte, 16).unwrap())
        .collect()
}

fn tlv(kind: u8, value: &[u8]) -> Vec<u8> {
    assert!(value.len() < 512);
    let header = (u16::from(kind) << 9) | value.len() as u16;
    let mut out = header.to_be_bytes().to_vec();
    out.extend_from_slice(value);
    out
}

fn with_subtype(subtype: u8, id: &[u8]) -> Vec<u8> {
    let mut value = vec![subtype];
    value.extend_from_slice(id);
    value
}

/// An untagged LLDP frame carrying `tlvs`.
fn frame(tlvs: &[Vec<u8>]) -> Vec<u8> {
    let mut out = vec![0x01, 0x80, 0xc2, 0x00, 0x00, 0x0e];
    out.extend_from_slice(&[0x2c, 0x6b, 0xf5, 0x9a, 0x3b, 0xc1]);
    out.extend_from_slice(&[0x88, 0xcc]);
    for tlv in tlvs {
        out.extend_from_slice(tlv);
    }
    out
}

fn chassis_mac() -> Vec<u8> {
    tlv(1, &with_subtype(4, &SWITCH_MAC))
}

fn port_name(name: &str) -> Vec<u8> {
    tlv(2, &with_subtype(5, name.as_bytes()))
}

fn ttl() -> Vec<u8> {
    tlv(3, &120u16.to_be_bytes())
}

fn end() -> Vec<u8> {
    tlv(0, &[])
}

fn pvid(vlan: u16) -> Vec<u8> {
    let mut value = vec![0x00, 0x80, 0xc2, 0x01];
    value.extend_from_slice(&vlan.to_be_bytes());
    tlv(127, &value)
}

fn neighbor(chassis: &str, port: &str, vlan: Option<u16>, name: Option<&str>) -> LldpNeighbor {
    LldpNeighbor {
        chassis_id: chassis.into(),
        port_id: port.into(),
        vlan,
        system_name: name.map(Into::into),
    }
}

fn check(frame: &[u8], expect: Result<LldpNeighbor, &str>) {
    match (parse_frame(frame), expect) {
        (Ok(got), Ok(want)) => assert_eq!(got, want),
        (Err(error), Err(want)) => assert_eq!(error.to_string(), want),
        (got, want) => panic!("got {got:?}, expected {want:?}"),
    }
}

#[test]
fn a_juniper_capture_gives_chassis_port_vlan_and_name() {
    check(
        &capture("juniper-qfx5100.hex"),
        Ok(neighbor(
            "2c:6b:f5:9a:3b:c0",
            "517",
            Some(100),
            Some("tor-a12.dc1"),
        )),
    );
}

#[test]
fn a_tagged_arista_capture_with_padding_is_read() {
    check(
        &capture("arista-tagged.hex"),
        Ok(neighbor(
            "44:4c:a8:01:02:00",
            "Ethernet13",
            None,
            Some("leaf-b07"),
        )),
    );
}

#[test]
fn id_subtypes_are_rendered_by_kind() {
    let name = tlv(5, b"tor-1");
    // Chassis: MAC (4), network address (5) IPv4 and IPv6, locally assigned (7).
    let ipv4 = tlv(1, &[5, 1, 10, 0, 0, 1]);
    let mut v6 = vec![5, 2];
    v6.extend_from_slice(&"fd00::1".parse::<std::net::Ipv6Addr>().unwrap().octets());
    let ipv6 = tlv(1, &v6);
    let local = tlv(1, &with_subtype(7, b"FDO21330ABC"));
    check(
        &frame(&[ipv4, port_name("Ethernet1/1"), ttl(), end()]),
        Ok(neighbor("10.0.0.1", "Ethernet1/1", None, None)),
    );
    check(
        &frame(&[ipv6, port_name("Ethernet1/1"), ttl(), end()]),
        Ok(neighbor("fd00::1", "Ethernet1/1", None, None)),
    );
    // Port: MAC (3), interface name (5, above), locally assigned (7).
    let port_mac = tlv(2, &with_subtype(3, &[0, 0x1b, 0x21, 0xaa, 0xbb, 0xcc]));
    check(
        &frame(&[local.clone(), port_mac, ttl(), name.clone(), end()]),
        Ok(neighbor(
            "FDO21330ABC",
            "00:1b:21:aa:bb:cc",
            None,
            Some("tor-1"),
        )),
    );
    let port_local = tlv(2, &with_subtype(7, b"Gi0/12\0"));
    check(
        &frame(&[local, port_local, ttl(), pvid(42), end()]),
        Ok(neighbor("FDO21330ABC", "Gi0/12", Some(42), None)),
    );
}

#[test]
fn a_frame_without_end_tlv_ends_at_the_frame_end() {
    check(
        &frame(&[chassis_mac(), port_name("et-0/0/1"), ttl()]),
        Ok(neighbor("2c:6b:f5:9a:3b:c0", "et-0/0/1", None, None)),
    );
}

#[test]
fn tlvs_after_end_are_ignored() {
    check(
        &frame(&[chassis_mac(), port_name("p1"), end(), tlv(5, b"ignored")]),
        Ok(neighbor("2c:6b:f5:9a:3b:c0", "p1", None, None)),
    );
}

#[test]
fn other_organisations_and_a_zero_pvid_leave_vlan_unset() {
    let dcbx = tlv(127, &[0x00, 0x1b, 0x21, 0x01, 0x00, 0x64]);
    let vlan_name = tlv(127, &[0x00, 0x80, 0xc2, 0x03, 0x00, 0x64, 1, b'x']);
    check(
        &frame(&[
            chassis_mac(),
            port_name("p1"),
            dcbx,
            vlan_name,
            pvid(0),
            end(),
        ]),
        Ok(neighbor("2c:6b:f5:9a:3b:c0", "p1", None, None)),
    );
}

#[test]
fn the_wrong_ethertype_is_refused() {
    let mut ipv4 = frame(&[chassis_mac(), port_name("p1"), end()]);
    ipv4[12..14].copy_from_slice(&[0x08, 0x00]);
    check(&ipv4, Err("ethertype 0x0800 is not LLDP (0x88cc)"));
    // A VLAN tag in front of something else.
    let mut tagged = frame(&[]);
    tagged.splice(12..14, [0x81, 0x00, 0x00, 0x64, 0x86, 0xdd]);
    check(&tagged, Err("ethertype 0x86dd is not LLDP (0x88cc)"));
}

#[test]
fn truncated_frames_are_refused() {
    check(
        &[],
        Err("frame of 0 bytes is too short for an ethernet header"),
    );
    check(
        &frame(&[])[..13],
        Err("frame of 13 bytes is too short for an ethernet header"),
    );
    let mut tagged = frame(&[]);
    tagged.truncate(12);
    tagged.extend_from_slice(&[0x81, 0x00, 0x00]);
    check(
        &tagged,
        Err("frame of 15 bytes is too short for an ethernet header"),
    );

    let whole = frame(&[chassis_mac(), port_name("Ethernet1/1"), end()]);
    // Cut inside the port id value, then inside the port id header.
    check(
        &whole[..whole.len() - 5],
        Err("port id tlv at byte 23 claims 12 bytes, 9 left in the frame"),
    );
    check(&whole[..24], Err("tlv header at byte 23 is truncated"));
    // Every prefix of a real capture is an error or a neighbour, never a panic.
    let juniper = capture("juniper-qfx5100.hex");
    for len in 0..juniper.len() {
        let _ = parse_frame(&juniper[..len]);
    }
}

#[test]
fn zero_length_and_short_tlvs_are_refused() {
    check(
        &frame(&[tlv(1, &[]), port_name("p1"), end()]),
        Err("chassis id tlv at byte 14: empty, expected a subtype and an id"),
    );
    check(
        &frame(&[chassis_mac(), tlv(2, &[5]), end()]),
        Err("port id tlv at byte 23: subtype 5 with an empty id"),
    );
    check(
        &frame(&[tlv(1, &[4, 1, 2, 3]), port_name("p1"), end()]),
        Err("chassis id tlv at byte 14: mac address of 3 bytes, expected 6"),
    );
    check(
        &frame(&[tlv(1, &[5, 1, 10, 0, 1]), port_name("p1"), end()]),
        Err("chassis id tlv at byte 14: address family 1 with a 3-byte address"),
    );
    check(
        &frame(&[chassis_mac(), port_name("p1"), tlv(127, &[0, 0x80]), end()]),
        Err("organisationally specific tlv at byte 28: length 2, expected at least 4"),
    );
    check(
        &frame(&[
            chassis_mac(),
            port_name("p1"),
            tlv(127, &[0, 0x80, 0xc2, 1, 0]),
        ]),
        Err("organisationally specific tlv at byte 28: port vlan id of length 5, expected 6"),
    );
    check(
        &frame(&[chassis_mac(), port_name("p1"), tlv(0, &[0])]),
        Err("end tlv at byte 28: length 1, expected 0"),
    );
    // An empty system name is no name.
    check(
        &frame(&[chassis_mac(), port_name("p1"), tlv(5, &[]), end()]),
        Ok(neighbor("2c:6b:f5:9a:3b:c0", "p1", None, None)),
    );
}

#[test]
fn mandatory_tlvs_must_be_present_once() {
    check(&frame(&[port_name("p1"), end()]), Err("no chassis id tlv"));
    check(&frame(&[chassis_mac(), end()]), Err("no port id tlv"));
    check(&frame(&[]), Err("no chassis id tlv"));
    check(
        &frame(&[chassis_mac(), chassis_mac(), port_name("p1"), end()]),
        Err("duplicate chassis id tlv at byte 23"),
    );
}

#[test]
fn non_utf8_ids_become_hex_and_names_are_decoded_lossily() {
    check(
        &frame(&[
            tlv(1, &with_subtype(7, &[0xff, 0xfe, 0x41])),
            tlv(2, &with_subtype(5, b"port\xe9")),
            tlv(5, b"sw\xe9itch"),
            end(),
        ]),
        Ok(neighbor(
            "ff:fe:41",
            "70:6f:72:74:e9",
            None,
            Some("sw\u{fffd}itch"),
        )),
    );
}

#[test]
fn oversized_frames_are_refused() {
    let mut big = frame(&[chassis_mac(), port_name("p1"), end()]);
    big.resize(FRAME_BYTES_MAX + 1, 0);
    assert_eq!(
        parse_frame(&big),
        Err(LldpError::TooLarge {
            len: FRAME_BYTES_MAX + 1
        })
    );
}

#[test]
fn no_single_byte_corruption_of_a_capture_panics() {
    let juniper = capture("juniper-qfx5100.hex");
    for position in 0..juniper.len() {
        for value in [0x00, 0x01, 0x7f, 0x80, 0xfe, 0xff] {
            let mut corrupt = juniper.clone();
            corrupt[position] = value;
            let _ = parse_frame(&corrupt);
        }
    }
}
