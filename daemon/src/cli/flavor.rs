//! `bearman flavor`: what nodes boot.

use super::*;

pub(super) fn print_flavors(flavors: &[Flavor], output: Output) -> anyhow::Result<()> {
    if output == Output::Json {
        return print_json(&flavors);
    }
    let rows = flavors
        .iter()
        .map(|f| {
            vec![
                f.name.clone(),
                f.kernel.url.clone(),
                f.initrds.len().to_string(),
                f.cmdline_template.clone(),
            ]
        })
        .collect::<Vec<_>>();
    table::print(&["NAME", "KERNEL", "INITRDS", "CMDLINE"], &rows)?;
    Ok(())
}

pub(super) fn load_flavor_file(path: &std::path::Path) -> anyhow::Result<Flavor> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let is_toml = path.extension().is_some_and(|e| e == "toml");
    if is_toml {
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    } else {
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }
}

pub(super) async fn flavor(command: FlavorCommand) -> anyhow::Result<()> {
    match command {
        FlavorCommand::List { api } => {
            let client = ApiClient::new(&api.url, api.token.clone(), api.ca_file.as_deref())?;
            let flavors: Vec<Flavor> = client.call("GET", "/flavors", None::<&()>).await?;
            print_flavors(&flavors, api.output)
        }
        FlavorCommand::Show { name, api } => {
            let client = ApiClient::new(&api.url, api.token.clone(), api.ca_file.as_deref())?;
            let flavor: Flavor = client
                .call("GET", &format!("/flavors/{name}"), None::<&()>)
                .await?;
            print_json(&flavor)
        }
        FlavorCommand::Create {
            api,
            file,
            name,
            kernel,
            kernel_sha256,
            initrd,
            initrd_sha256,
            cmdline,
            replace,
        } => {
            let client = ApiClient::new(&api.url, api.token.clone(), api.ca_file.as_deref())?;
            let flavor = match file {
                Some(path) => load_flavor_file(&path)?,
                None => {
                    if initrd.len() != initrd_sha256.len() {
                        bail!(
                            "{} --initrd but {} --initrd-sha256: give one checksum per initrd",
                            initrd.len(),
                            initrd_sha256.len()
                        );
                    }
                    Flavor {
                        name: name.unwrap_or_default(),
                        kernel: Artifact {
                            url: kernel.unwrap_or_default(),
                            sha256: kernel_sha256.unwrap_or_default(),
                        },
                        initrds: initrd
                            .into_iter()
                            .zip(initrd_sha256)
                            .map(|(url, sha256)| Artifact { url, sha256 })
                            .collect(),
                        cmdline_template: cmdline,
                        firmware_expected: Default::default(),
                    }
                }
            };
            let created: Flavor = if replace {
                client
                    .call("PUT", &format!("/flavors/{}", flavor.name), Some(&flavor))
                    .await?
            } else {
                client.call("POST", "/flavors", Some(&flavor)).await?
            };
            print_flavors(&[created], api.output)
        }
        FlavorCommand::Delete { name, api } => {
            let client = ApiClient::new(&api.url, api.token.clone(), api.ca_file.as_deref())?;
            let _: Value = client
                .call("DELETE", &format!("/flavors/{name}"), None::<&()>)
                .await?;
            eprintln!("flavor {name} deleted");
            Ok(())
        }
    }
}
