//! Firmware versions compared with what a flavor expects: one rule, used by the daemon
//! (the audit event at registration) and by the agent (its console warning).

use crate::FirmwareVersions;

/// The BIOS (DMI `bios_version`).
pub const COMPONENT_BIOS: &str = "bios";
/// The BMC (`ipmitool mc info`'s firmware revision).
pub const COMPONENT_BMC: &str = "bmc";
/// Prefix of a NIC's component name: `nic:<interface name>`.
pub const COMPONENT_NIC_PREFIX: &str = "nic:";

/// The component name of the NIC called `name`.
pub fn nic_component(name: &str) -> String {
    format!("{COMPONENT_NIC_PREFIX}{name}")
}

/// Every component `versions` names, with its version, in one fixed order: BIOS, BMC,
/// then NICs by name.
pub fn components(versions: &FirmwareVersions) -> Vec<(String, Option<String>)> {
    let mut listed = vec![
        (COMPONENT_BIOS.to_string(), versions.bios.clone()),
        (COMPONENT_BMC.to_string(), versions.bmc.clone()),
    ];
    for (nic, version) in &versions.nics {
        listed.push((nic_component(nic), Some(version.clone())));
    }
    listed
}

/// The version `versions` gives `component`, if it gives one.
pub fn version_of<'a>(versions: &'a FirmwareVersions, component: &str) -> Option<&'a String> {
    match component {
        COMPONENT_BIOS => versions.bios.as_ref(),
        COMPONENT_BMC => versions.bmc.as_ref(),
        other => other
            .strip_prefix(COMPONENT_NIC_PREFIX)
            .and_then(|nic| versions.nics.get(nic)),
    }
}

/// One firmware component that is not at the version the node's flavor expects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FirmwareDifference {
    /// `bios`, `bmc` or `nic:<name>`.
    pub component: String,
    pub expected: String,
    /// `None` when the agent could not read the version.
    pub reported: Option<String>,
}

impl std::fmt::Display for FirmwareDifference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.reported {
            Some(reported) => write!(
                f,
                "{} firmware {reported}, expected {}",
                self.component, self.expected
            ),
            None => write!(
                f,
                "{} firmware unknown, expected {}",
                self.component, self.expected
            ),
        }
    }
}

/// Components whose reported version differs from the expected one. A component with no
/// expectation is never a difference; one expected but not reported is.
pub fn differences(
    expected: &FirmwareVersions,
    reported: &FirmwareVersions,
) -> Vec<FirmwareDifference> {
    let mut differences = Vec::new();
    let mut compare = |component: String, expected: &Option<String>, reported: Option<&String>| {
        if let Some(expected) = expected {
            if reported != Some(expected) {
                differences.push(FirmwareDifference {
                    component,
                    expected: expected.clone(),
                    reported: reported.cloned(),
                });
            }
        }
    };
    compare(
        COMPONENT_BIOS.into(),
        &expected.bios,
        reported.bios.as_ref(),
    );
    compare(COMPONENT_BMC.into(), &expected.bmc, reported.bmc.as_ref());
    for (nic, version) in &expected.nics {
        compare(
            nic_component(nic),
            &Some(version.clone()),
            reported.nics.get(nic),
        );
    }
    differences
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_name_what_is_behind_or_unknown_and_ignore_what_is_not_expected() {
        let expected = FirmwareVersions {
            bios: Some("2.1".into()),
            bmc: None,
            nics: [("eno1".to_string(), "22.31".to_string())].into(),
        };
        let reported = FirmwareVersions {
            bios: Some("2.0".into()),
            bmc: Some("anything".into()),
            nics: Default::default(),
        };
        let lines: Vec<String> = differences(&expected, &reported)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            lines,
            vec![
                "bios firmware 2.0, expected 2.1",
                "nic:eno1 firmware unknown, expected 22.31"
            ]
        );
        assert!(differences(&expected, &expected).is_empty());
    }
}
