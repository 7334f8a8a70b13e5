//! What a node boots: the stage-1 script every machine chains to, and the per-node target
//! OS script and profile rendered from its flavor.

use bearman_proto::ipxe;
use bearman_proto::uuid::NodeUuid;
use bearman_proto::BootProfile;
use serde::{Deserialize, Serialize};

use super::model::{Flavor, Node};

/// Where the stage-1 image lives and what it is told on its command line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage1Config {
    /// Kernel URL; a relative path is resolved against the public URL.
    pub kernel: String,
    /// Initramfs URLs; relative paths resolved likewise.
    pub initrds: Vec<String>,
    /// Extra kernel arguments (console, quiet, …).
    pub cmdline: String,
}

impl Default for Stage1Config {
    fn default() -> Self {
        Stage1Config {
            kernel: "/images/stage1/vmlinuz".into(),
            initrds: vec!["/images/stage1/initrd.img".into()],
            cmdline: "console=ttyS0 console=tty0".into(),
        }
    }
}

/// Resolves `path` against `public_url` unless it is already absolute.
pub fn resolve_url(public_url: &str, path: &str) -> String {
    if path.starts_with("http://") || path.starts_with("https://") {
        path.to_string()
    } else {
        format!(
            "{}/{}",
            public_url.trim_end_matches('/'),
            path.trim_start_matches('/')
        )
    }
}

/// The stage-1 script. With `uuid` unset it carries iPXE's own `${uuid}` so one script
/// serves every machine that DHCP points at `/ipxe`.
pub fn render_stage1(config: &Stage1Config, public_url: &str, uuid: Option<&NodeUuid>) -> String {
    let uuid_text = uuid.map_or("${uuid}".to_string(), |uuid| uuid.to_string());
    let mut args = format!(
        "bearman.url={} bearman.uuid={}",
        public_url.trim_end_matches('/'),
        uuid_text
    );
    if !config.cmdline.is_empty() {
        args.push(' ');
        args.push_str(&config.cmdline);
    }
    let initrds: Vec<String> = config
        .initrds
        .iter()
        .map(|path| resolve_url(public_url, path))
        .collect();
    ipxe::render_boot(
        "Bearman stage 1: register hardware, then kexec the assigned OS",
        &resolve_url(public_url, &config.kernel),
        &args,
        &initrds,
    )
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("unknown placeholder {{{0}}}; known: hostname, uuid, url, ip, gateway, vlan")]
    UnknownPlaceholder(String),
    #[error("unclosed {{")]
    Unclosed,
}

const PLACEHOLDERS: [&str; 6] = ["hostname", "uuid", "url", "ip", "gateway", "vlan"];

/// Substitutes `{name}` placeholders; `lookup` is only asked for known names.
fn substitute(
    template: &str,
    mut lookup: impl FnMut(&str) -> String,
) -> Result<String, TemplateError> {
    let mut out = String::with_capacity(template.len() + 64);
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let close = after.find('}').ok_or(TemplateError::Unclosed)?;
        let name = &after[..close];
        if !PLACEHOLDERS.contains(&name) {
            return Err(TemplateError::UnknownPlaceholder(name.to_string()));
        }
        out.push_str(&lookup(name));
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Checks a template without a node, for flavor validation.
pub fn check_template(template: &str) -> Result<(), TemplateError> {
    substitute(template, |_| String::new()).map(|_| ())
}

/// The node's kernel command line from its flavor's template, always carrying
/// `bearman.url=` and `bearman.uuid=` (appended when the template does not set them): the
/// booted OS reports `installed` and heartbeats with them, and a node that cannot is
/// soon judged dead and fenced.
pub fn render_cmdline(
    flavor: &Flavor,
    node: &Node,
    public_url: &str,
) -> Result<String, TemplateError> {
    let mut cmdline = substitute_template(flavor, node, public_url)?;
    let words: Vec<&str> = cmdline.split_whitespace().collect();
    let missing: Vec<String> = [
        ("bearman.url", public_url.trim_end_matches('/').to_string()),
        ("bearman.uuid", node.uuid.to_string()),
    ]
    .into_iter()
    .filter(|(key, _)| {
        !words
            .iter()
            .any(|word| word.split('=').next() == Some(*key))
    })
    .map(|(key, value)| format!("{key}={value}"))
    .collect();
    for word in missing {
        if !cmdline.is_empty() && !cmdline.ends_with(' ') {
            cmdline.push(' ');
        }
        cmdline.push_str(&word);
    }
    Ok(cmdline)
}

fn substitute_template(
    flavor: &Flavor,
    node: &Node,
    public_url: &str,
) -> Result<String, TemplateError> {
    substitute(&flavor.cmdline_template, |name| match name {
        "hostname" => node.hostname.clone(),
        "uuid" => node.uuid.to_string(),
        "url" => public_url.trim_end_matches('/').to_string(),
        "ip" => node
            .network
            .bond0_addresses
            .first()
            .map(|cidr| cidr.split('/').next().unwrap_or_default().to_string())
            .unwrap_or_default(),
        "gateway" => node.network.gateway.clone().unwrap_or_default(),
        "vlan" => node.network.vlan.map(|v| v.to_string()).unwrap_or_default(),
        _ => String::new(),
    })
}

pub fn render_profile(
    flavor: &Flavor,
    node: &Node,
    public_url: &str,
) -> Result<BootProfile, TemplateError> {
    let resolve = |artifact: &bearman_proto::Artifact| bearman_proto::Artifact {
        url: resolve_url(public_url, &artifact.url),
        sha256: artifact.sha256.clone(),
    };
    Ok(BootProfile {
        flavor: flavor.name.clone(),
        kernel: resolve(&flavor.kernel),
        initrds: flavor.initrds.iter().map(resolve).collect(),
        cmdline: render_cmdline(flavor, node, public_url)?,
    })
}

/// The node's target OS as an iPXE script, which stage 1 parses into a kexec call.
pub fn render_target_script(profile: &BootProfile, node: &Node) -> String {
    let initrds: Vec<String> = profile.initrds.iter().map(|a| a.url.clone()).collect();
    ipxe::render_boot(
        &format!(
            "Bearman target OS for {} ({}): flavor {}",
            node.hostname, node.uuid, profile.flavor
        ),
        &profile.kernel.url,
        &profile.cmdline,
        &initrds,
    )
}

/// What stage 2 needs to set up the node's network (`GET /ipxe/{uuid}/detail`).
pub fn network_detail(node: &Node) -> bearman_proto::NetworkDetail {
    bearman_proto::NetworkDetail {
        hostname: node.hostname.clone(),
        vlan: node.network.vlan,
        bond0_addresses: node.network.bond0_addresses.clone(),
        bond0_slaves: node.mac_set(),
        gateway: node.network.gateway.clone(),
        dns: node.network.dns.clone(),
        mtu: if node.network.mtu == 0 {
            super::model::MTU_DEFAULT
        } else {
            node.network.mtu
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::model::NodeRole;
    use bearman_proto::uuid::NodeUuid;

    fn cmdline_for(template: &str) -> String {
        let artifact = bearman_proto::Artifact {
            url: "/images/hv/vmlinuz".into(),
            sha256: "ab".repeat(32),
        };
        let flavor = Flavor {
            name: "hv".into(),
            kernel: artifact,
            initrds: Vec::new(),
            cmdline_template: template.into(),
            firmware_expected: Default::default(),
        };
        let node = Node::new(
            NodeUuid::from_index(1, 2),
            "cn1".into(),
            NodeRole::Compute,
            0,
        );
        render_cmdline(&flavor, &node, "http://bearman:8080/").unwrap()
    }

    #[test]
    fn the_booted_os_is_always_told_where_bearman_is_and_who_it_is() {
        let uuid = NodeUuid::from_index(1, 2);
        assert_eq!(
            cmdline_for("console=ttyS0 hostname={hostname}"),
            format!(
                "console=ttyS0 hostname=cn1 bearman.url=http://bearman:8080 bearman.uuid={uuid}"
            )
        );
        assert_eq!(
            cmdline_for(""),
            format!("bearman.url=http://bearman:8080 bearman.uuid={uuid}")
        );
        // A template that sets them itself is left as written.
        assert_eq!(
            cmdline_for("bearman.uuid={uuid} quiet bearman.url=http://elsewhere"),
            format!("bearman.uuid={uuid} quiet bearman.url=http://elsewhere")
        );
        // A key that merely starts the same way is not the key.
        assert!(cmdline_for("bearman.urlx=1").ends_with(&format!(
            "bearman.urlx=1 bearman.url=http://bearman:8080 bearman.uuid={uuid}"
        )));
    }
}
