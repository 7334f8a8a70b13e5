//! The Kubernetes manifests in deploy/kubernetes/: validated offline against the
//! Kubernetes API's own JSON schemas (`kubernetes-validate --strict`, from the virtualenv
//! `scripts/install-deps.sh` makes: `.venv-k8s/`, or `BEARMAN_K8S_VENV`), and the fields
//! that make the replicas work checked against each other and against the daemon's
//! configuration: the probes hit `/healthz` and `/readyz` on a port the container opens,
//! every mounted path the config names exists, every Service targets a container port,
//! the disruption budget selects the pods. Without the validator the test fails, saying
//! so; it is never skipped.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn venv() -> PathBuf {
    std::env::var_os("BEARMAN_K8S_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".venv-k8s"))
}

fn manifests() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("deploy/kubernetes"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 5, "manifests found: {files:?}");
    files
}

fn validate(files: &[PathBuf]) -> std::process::Output {
    let validator = venv().join("bin/kubernetes-validate");
    assert!(
        validator.exists(),
        "{} is missing: run scripts/install-deps.sh (or point BEARMAN_K8S_VENV at a virtualenv with kubernetes-validate)",
        validator.display()
    );
    Command::new(validator)
        .arg("--strict")
        .args(files)
        .output()
        .expect("run kubernetes-validate")
}

/// Every document of every manifest, as JSON (through the validator's own PyYAML).
fn documents() -> Vec<Value> {
    let script = "import json, sys, yaml\n\
                  docs = [d for f in sys.argv[1:] for d in yaml.safe_load_all(open(f)) if d]\n\
                  print(json.dumps(docs))";
    let output = Command::new(venv().join("bin/python"))
        .arg("-c")
        .arg(script)
        .args(manifests())
        .output()
        .expect("run the venv's python");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|doc| doc["kind"] == kind).collect()
}

#[test]
fn the_manifests_pass_the_kubernetes_schemas_strictly() {
    let output = validate(&manifests());
    assert!(
        output.status.success(),
        "kubernetes-validate:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn the_validator_refuses_a_broken_manifest() {
    // A control: the check above would mean nothing if the validator passed anything.
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(repo().join("deploy/kubernetes/deployment.yaml")).unwrap();
    for (name, broken) in [
        ("type.yaml", text.replace("replicas: 3", "replicas: three")),
        (
            "unknown.yaml",
            text.replace("  replicas: 3", "  replicas: 3\n  replica: 3"),
        ),
    ] {
        assert_ne!(broken, text, "the mutation applies");
        let path = dir.path().join(name);
        std::fs::write(&path, broken).unwrap();
        let output = validate(&[path]);
        assert!(!output.status.success(), "{name} was accepted");
    }
}

#[test]
fn replicas_probes_ports_mounts_and_budget_fit_together() {
    let docs = documents();
    let deployments = of_kind(&docs, "Deployment");
    assert_eq!(deployments.len(), 1);
    let deployment = deployments[0];
    let replicas = deployment["spec"]["replicas"].as_u64().unwrap();
    assert!(replicas >= 2, "HA needs several replicas");
    let pod = &deployment["spec"]["template"]["spec"];
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    assert_eq!(deployment["spec"]["selector"]["matchLabels"], *labels);
    let container = pod["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "bearman")
        .expect("the bearman container");
    let ports: Vec<(&str, u64)> = container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap(),
                p["containerPort"].as_u64().unwrap(),
            )
        })
        .collect();
    let port_named = |name: &str| ports.iter().find(|(n, _)| *n == name).map(|(_, p)| *p);

    // Probes: liveness on /healthz, readiness on /readyz, on a port the pod opens.
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert!(
            port_named(get["port"].as_str().unwrap()).is_some(),
            "{probe} port"
        );
    }
    // Every container says what it needs.
    for c in pod["containers"]
        .as_array()
        .unwrap()
        .iter()
        .chain(pod["initContainers"].as_array().unwrap())
    {
        assert!(
            c["resources"]["requests"]["cpu"].is_string(),
            "{}",
            c["name"]
        );
        assert!(
            c["resources"]["requests"]["memory"].is_string(),
            "{}",
            c["name"]
        );
        assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
        assert_eq!(c["securityContext"]["capabilities"]["drop"][0], "ALL");
    }
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);

    // The configuration: what it listens on is what the container opens; every file it
    // names is under a mounted volume; HA is on.
    let config_map = of_kind(&docs, "ConfigMap")[0];
    let config: toml::Table = config_map["data"]["bearman.toml"]
        .as_str()
        .unwrap()
        .parse()
        .expect("the ConfigMap's bearman.toml is TOML");
    let get = |section: &str, key: &str| -> String {
        let table = if section.is_empty() {
            &config
        } else {
            config[section].as_table().unwrap()
        };
        match &table[key] {
            toml::Value::String(text) => text.clone(),
            other => other.to_string(),
        }
    };
    let port_of = |address: &str| address.rsplit(':').next().unwrap().parse::<u64>().unwrap();
    assert_eq!(Some(port_of(&get("", "listen"))), port_named("admin-https"));
    assert_eq!(
        Some(port_of(&get("tls", "boot_listen"))),
        port_named("boot-http")
    );
    assert!(get("", "public_url").starts_with("http://"));
    assert_eq!(get("cluster", "enabled"), "true");
    let mounts: Vec<&str> = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["mountPath"].as_str().unwrap())
        .collect();
    let mounted = |file: &str| mounts.iter().any(|m| file.starts_with(&format!("{m}/")));
    for file in [
        get("tls", "cert_file"),
        get("tls", "key_file"),
        get("bmc", "secrets_file"),
    ] {
        assert!(
            mounted(&file),
            "{file} is under a mounted volume: {mounts:?}"
        );
    }
    assert!(mounts.contains(&get("", "data_dir").as_str()));
    // The database URL comes from a mounted Secret file, never argv or the ConfigMap.
    let env = container["env"].as_array().unwrap();
    let url_file = env
        .iter()
        .find(|e| e["name"] == "BEARMAN_DATABASE_URL_FILE")
        .expect("BEARMAN_DATABASE_URL_FILE")["value"]
        .as_str()
        .unwrap();
    assert!(mounted(url_file), "{url_file}");
    assert!(!config_map["data"]["bearman.toml"]
        .as_str()
        .unwrap()
        .contains("postgres://"));
    let args = container["args"].as_array().unwrap();
    assert!(args
        .iter()
        .all(|a| !a.as_str().unwrap().contains("postgres")));

    // Services reach container ports by name; the budget keeps a leader and a spare.
    let services = of_kind(&docs, "Service");
    assert_eq!(services.len(), 2);
    for service in services {
        assert_eq!(service["spec"]["selector"], *labels);
        for port in service["spec"]["ports"].as_array().unwrap() {
            assert!(port_named(port["targetPort"].as_str().unwrap()).is_some());
        }
    }
    let budget = of_kind(&docs, "PodDisruptionBudget")[0];
    assert_eq!(budget["spec"]["selector"]["matchLabels"], *labels);
    let min_available = budget["spec"]["minAvailable"].as_u64().unwrap();
    assert!(min_available >= 2 && min_available < replicas);
}

#[test]
fn the_seed_sweep_job_passes_the_schemas_and_covers_every_shard() {
    let file = repo().join("deploy/sim-sweep/indexed-job.yaml");
    let output = validate(std::slice::from_ref(&file));
    assert!(
        output.status.success(),
        "kubernetes-validate:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let text = std::fs::read_to_string(&file).unwrap();
    // One pod per shard, and the shard count the command names is the Job's.
    assert!(text.contains("completionMode: Indexed"));
    assert!(text.contains("completions: 8"));
    assert!(text.contains("--shard \"${JOB_COMPLETION_INDEX}/8\""));
    let workflow =
        std::fs::read_to_string(repo().join("deploy/sim-sweep/github-actions.yml")).unwrap();
    assert!(workflow.contains("shard: [0, 1, 2, 3]"));
    assert!(workflow.contains("--shard ${{ matrix.shard }}/4"));
    assert!(workflow.contains("bearman-sim merge reports/*.json"));
}
