//! The deployment examples under `examples/` are checked without a cluster, Docker or a VM:
//!
//! - every YAML file parses (all documents, duplicate keys refused), through Python's PyYAML;
//! - Kubernetes: each install (`control-plane`, `control-plane-etcd`, `api`) is rendered by
//!   `kubectl kustomize`, as `kubectl apply -k` would, and the rendered objects are checked:
//!   strictly valid against the Kubernetes schemas; the policies ConfigMap equals `examples/three-tier/policies` and validates; the
//!   sidecar container's own command and arguments, with the ConfigMap's config and a `POD_IP`,
//!   pass `sidewall proxy --check`; the init container's `iptables install`, run with
//!   `--dry-run`, redirects to the sidecar's listeners, spares the app's probe ports and exempts
//!   the sidecar's UID; the Service's ClusterIP is the address the sidecar registers;
//! - Compose: every sidecar config passes `sidewall proxy --check` and matches its service's IP,
//!   UID and namespace sharing in `compose.yaml`;
//! - systemd: the units pass `systemd-analyze verify`, and the example sidecar config checks.
//!
//! PyYAML (`python3-yaml`, installed by `scripts/test-deps`) and `systemd-analyze` are optional:
//! without them the parts that need them print `SKIPPED: ...` and pass.

#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers outside #[test] fns panic to report failures

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use support::{repo_root, sidewall};

/// Loads every document of a YAML file and prints them as one JSON array. Like
/// `yaml.safe_load_all`, but a duplicate key is an error (Kubernetes and Compose refuse them).
const LOAD_YAML: &str = r#"
import json, sys, yaml

class Strict(yaml.SafeLoader):
    pass

def mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if isinstance(key, str) and key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, "duplicate key %r" % key, key_node.start_mark)
        if isinstance(key, str):
            seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)

Strict.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
with open(sys.argv[1]) as f:
    print(json.dumps(list(yaml.load_all(f, Loader=Strict)), default=str))
"#;

/// The pod IP the Kubernetes sidecar's wrapper is given in these tests.
const POD_IP: &str = "10.244.1.23";
const POD_NAME: &str = "api-7d9f8b6c5d-x2k4q";
/// What `sidewall ca fingerprint` prints, as the ConfigMap `sidewall-ca` holds it.
const FINGERPRINT: &str = "5059b937aab8c015787ed637610e963d4871edd4da926e870ac54541d05d6c22";

fn pyyaml_available() -> bool {
    Command::new("python3")
        .args(["-c", "import yaml"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Every document of `path`, or `None` (after saying SKIPPED) when PyYAML is missing.
fn yaml_docs(path: &Path) -> Option<Vec<Value>> {
    if !pyyaml_available() {
        eprintln!("SKIPPED: PyYAML missing (scripts/test-deps installs python3-yaml)");
        return None;
    }
    Some(parse_yaml(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

fn parse_yaml(path: &Path) -> Result<Vec<Value>, String> {
    let output = Command::new("python3")
        .args(["-c", LOAD_YAML])
        .arg(path)
        .output()
        .map_err(|e| e.to_string())?;
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    serde_json::from_slice(&output.stdout).map_err(|e| e.to_string())
}

/// The documents of a YAML text (through a temporary file, as [`parse_yaml`] reads files).
fn parse_yaml_text(text: &str) -> Vec<Value> {
    let file = tempfile::NamedTempFile::new().unwrap();
    fs::write(file.path(), text).unwrap();
    parse_yaml(file.path()).unwrap()
}

fn examples() -> PathBuf {
    repo_root().join("examples")
}

/// The directories under examples/kubernetes that a platform team applies with
/// `kubectl apply -k`.
const KUSTOMIZATIONS: [&str; 3] = ["control-plane", "control-plane-etcd", "api"];

/// What `kubectl kustomize examples/kubernetes/NAME` renders, written to a file under `out`.
fn kustomize(name: &str, out: &Path) -> PathBuf {
    let file = out.join(format!("{name}.yaml"));
    fs::write(&file, support::kustomize(name)).unwrap();
    file
}

/// The objects `kubectl apply -k examples/kubernetes/NAME` would apply, or `None` (after
/// saying SKIPPED) when PyYAML is missing.
fn rendered(name: &str) -> Option<Vec<Value>> {
    let temp = tempfile::tempdir().unwrap();
    let file = kustomize(name, temp.path());
    yaml_docs(&file)
}

/// Every `*.yaml` / `*.yml` file under `dir`, recursively, sorted.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(yaml_files(&path));
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            found.push(path);
        }
    }
    found.sort();
    found
}

/// The one document of `kind` named `name`.
fn doc<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    let matching: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .collect();
    assert_eq!(matching.len(), 1, "expected one {kind} named {name}");
    matching[0]
}

fn str_of(value: &Value) -> &str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("not a string: {value}"))
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {value}"))
        .iter()
        .map(|v| str_of(v).to_owned())
        .collect()
}

fn pod_spec(deployment: &Value) -> &Value {
    &deployment["spec"]["template"]["spec"]
}

fn container<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn env_value<'a>(container: &'a Value, name: &str) -> Option<&'a Value> {
    container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)
}

/// Where `container` mounts the volume made from the ConfigMap or Secret `source` (`key` is
/// "configMap" or "secret").
fn mount_of(pod: &Value, container: &Value, key: &str, source: &str) -> String {
    let field = if key == "secret" {
        "secretName"
    } else {
        "name"
    };
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v[key][field] == source)
        .unwrap_or_else(|| panic!("no volume for the {key} {source}"));
    let mount = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == volume["name"])
        .unwrap_or_else(|| panic!("the {key} {source} is not mounted"));
    str_of(&mount["mountPath"]).to_owned()
}

/// The port of an `IP:PORT` listener address.
fn port_of(address: &Value) -> u64 {
    str_of(address).rsplit_once(':').unwrap().1.parse().unwrap()
}

/// `sidewall proxy --config FILE --check` accepts the file.
fn assert_sidecar_config_checks(file: &Path) -> String {
    let run = sidewall(["proxy", "--config", file.to_str().unwrap(), "--check"]);
    assert_eq!(
        run.code,
        0,
        "{}: {}{}",
        file.display(),
        run.stdout,
        run.stderr
    );
    assert!(run.stdout.contains("OK"), "{}", run.stdout);
    run.stdout
}

#[test]
fn every_yaml_file_under_examples_is_well_formed() {
    let files = yaml_files(&examples());
    assert!(files.len() >= 13, "only {} YAML files", files.len());
    if !pyyaml_available() {
        eprintln!("SKIPPED: PyYAML missing (scripts/test-deps installs python3-yaml)");
        return;
    }
    let mut failures = Vec::new();
    for file in &files {
        match parse_yaml(file) {
            Ok(docs) if docs.is_empty() || docs.iter().any(Value::is_null) => {
                failures.push(format!("{}: an empty document", file.display()))
            }
            Ok(_) => {}
            Err(error) => failures.push(format!("{}: {error}", file.display())),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn kubernetes_policies_configmap_is_the_three_tier_policies_and_validates() {
    let Some(docs) = rendered("control-plane") else {
        return;
    };
    let configmap = doc(&docs, "ConfigMap", "sidewall-policies");
    assert_eq!(configmap["metadata"]["namespace"], "sidewall-system");
    let data = configmap["data"].as_object().unwrap();

    let source = examples().join("three-tier/policies");
    let expected: BTreeMap<String, String> = yaml_files(&source)
        .into_iter()
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, fs::read_to_string(&p).unwrap())
        })
        .collect();
    let actual: BTreeMap<String, String> = data
        .iter()
        .map(|(k, v)| (k.clone(), str_of(v).to_owned()))
        .collect();
    assert_eq!(
        actual.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>(),
        "the ConfigMap's keys are not the policy files"
    );
    for (name, text) in &expected {
        assert_eq!(
            &actual[name], text,
            "{name} differs from examples/three-tier/policies/{name}"
        );
    }

    let extracted = tempfile::tempdir().unwrap();
    for (name, text) in &actual {
        fs::write(extracted.path().join(name), text).unwrap();
    }
    let run = sidewall(["policy", "validate", extracted.path().to_str().unwrap()]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains("3 policies, 4 rules OK"),
        "{}",
        run.stdout
    );
}

/// What each kustomization in examples/kubernetes renders is valid against the Kubernetes API's
/// own schemas, with nothing unknown in it (kubernetes-validate from PyPI, `--strict`;
/// `scripts/test-deps` installs it), for a Kubernetes as old as 1.29 and the newest the tool
/// knows. Every YAML file there is a kustomization or named by one, so nothing goes unchecked.
#[test]
fn kubernetes_installs_render_and_validate_strictly_against_the_kubernetes_schemas() {
    let temp = tempfile::tempdir().unwrap();
    let manifests: Vec<PathBuf> = KUSTOMIZATIONS
        .iter()
        .map(|name| kustomize(name, temp.path()))
        .collect();
    let mut named = Vec::new();
    for name in KUSTOMIZATIONS {
        let dir = examples().join("kubernetes").join(name);
        let text = fs::read_to_string(dir.join("kustomization.yaml")).unwrap();
        for line in text.lines() {
            let entry = line
                .trim_start()
                .trim_start_matches("- ")
                .trim_start_matches("path: ");
            if entry.ends_with(".yaml") && !entry.contains(' ') {
                named.push(dir.join(entry).canonicalize().unwrap());
            }
        }
    }
    for file in yaml_files(&examples().join("kubernetes")) {
        let file = file.canonicalize().unwrap();
        assert!(
            file.ends_with("kustomization.yaml") || named.contains(&file),
            "{} is in no kustomization, so nothing applies or checks it",
            file.display()
        );
    }
    for version in ["1.29.0", "1.37.0"] {
        let run = std::process::Command::new("kubernetes-validate")
            .args(["--strict", "--quiet", "-k", version])
            .args(&manifests)
            .output()
            .expect("kubernetes-validate (PyPI; scripts/test-deps installs it)");
        assert!(
            run.status.success(),
            "Kubernetes {version}:\n{}{}",
            String::from_utf8_lossy(&run.stdout),
            String::from_utf8_lossy(&run.stderr)
        );
    }
}

#[test]
fn kubernetes_control_plane_serves_probes_and_watches_the_policies() {
    let Some(docs) = rendered("control-plane") else {
        return;
    };
    doc(&docs, "Namespace", "sidewall-system");
    let deployment = doc(&docs, "Deployment", "sidewall-control-plane");
    let pod = pod_spec(deployment);
    let cp = container(&pod["containers"], "control-plane");
    let command = strings(&cp["command"]);
    assert_eq!(
        command,
        [
            "sidewall",
            "control-plane",
            "--data-dir",
            "/var/lib/sidewall",
            "--listen",
            "0.0.0.0:4600",
            "--admin-listen",
            "0.0.0.0:4690",
            "--policies-dir",
            "/etc/sidewall/policies",
            "--config",
            "/etc/sidewall/config/control-plane.yaml"
        ]
    );
    check_attestation_config(&docs, pod, cp, &command);
    // The data directory is the PVC, the policies directory the policies ConfigMap.
    let pvc = doc(
        &docs,
        "PersistentVolumeClaim",
        "sidewall-control-plane-data",
    );
    let data_volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"])
        .expect("the PVC is a volume");
    let data_mount = cp["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == data_volume["name"])
        .expect("the PVC is mounted");
    assert_eq!(data_mount["mountPath"], "/var/lib/sidewall");
    assert_eq!(
        mount_of(pod, cp, "configMap", "sidewall-policies"),
        "/etc/sidewall/policies"
    );
    // `kubectl exec ... sidewall status` finds the data directory.
    assert_eq!(
        env_value(cp, "SIDEWALL_DATA_DIR").unwrap()["value"],
        "/var/lib/sidewall"
    );
    // One writer of the embedded store.
    assert_eq!(deployment["spec"]["replicas"], 1);
    assert_eq!(deployment["spec"]["strategy"]["type"], "Recreate");

    // Probes on the admin port's /live and /ready; the Service exposes 4600 and 4690.
    let named_port = |name: &str| {
        cp["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("no port {name}"))["containerPort"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(named_port("api"), 4600);
    assert_eq!(named_port("admin"), 4690);
    for (probe, path) in [("livenessProbe", "/live"), ("readinessProbe", "/ready")] {
        assert_eq!(cp[probe]["httpGet"]["path"], path);
        assert_eq!(cp[probe]["httpGet"]["port"], "admin");
    }
    let service = doc(&docs, "Service", "sidewall-control-plane");
    let ports: Vec<u64> = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["port"].as_u64().unwrap())
        .collect();
    assert_eq!(ports, [4600, 4690]);
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    for (key, value) in service["spec"]["selector"].as_object().unwrap() {
        assert_eq!(&labels[key], value, "the Service does not select the pod");
    }
}

/// The control plane's attestation settings in the rendered `docs`: its `--config` file is the
/// ConfigMap `sidewall-control-plane-config`, whose `jwksFile` is in the mount of the ConfigMap
/// `sidewall-k8s-issuer` (README step 1), whose `issuer` key is `SIDEWALL_K8S_ISSUER`. Returns
/// the configuration file's text.
fn check_attestation_config(docs: &[Value], pod: &Value, cp: &Value, command: &[String]) -> String {
    let at = command.iter().position(|a| a == "--config").unwrap() + 1;
    let (mount, key) = command[at].rsplit_once('/').unwrap();
    assert_eq!(
        mount_of(pod, cp, "configMap", "sidewall-control-plane-config"),
        mount
    );
    let text =
        str_of(&doc(docs, "ConfigMap", "sidewall-control-plane-config")["data"][key]).to_owned();
    let config = &parse_yaml_text(&text)[0];
    let kubernetes = &config["attestation"]["kubernetes"];
    assert_eq!(kubernetes["issuer"], "${SIDEWALL_K8S_ISSUER}");
    assert_eq!(kubernetes["audience"], "sidewall");
    assert_eq!(
        kubernetes["jwksFile"],
        format!(
            "{}/jwks.json",
            mount_of(pod, cp, "configMap", "sidewall-k8s-issuer")
        )
    );
    assert_eq!(
        env_value(cp, "SIDEWALL_K8S_ISSUER").unwrap()["valueFrom"]["configMapKeyRef"],
        serde_json::json!({"name": "sidewall-k8s-issuer", "key": "issuer"})
    );
    assert!(strings(&kubernetes["namespaces"]).contains(&"demo".to_owned()));
    text
}

/// Runs the Kubernetes sidecar container's command and arguments as the pod would, its config
/// from the ConfigMap's mount and `POD_IP` from the downward API, with `--check` appended (and
/// once without `POD_IP`, which must fail naming it). Returns the config as the sidecar reads
/// it (`${POD_IP}` replaced) and the check's stdout.
fn check_kubernetes_sidecar_config(
    docs: &[Value],
    sidecar: &Value,
    pod: &Value,
    dir: &Path,
) -> (PathBuf, String) {
    assert_eq!(
        strings(&sidecar["command"]),
        ["sidewall"],
        "no shell wrapper: the image needs no shell"
    );
    let mut args = strings(&sidecar["args"]);
    let at = args.iter().position(|a| a == "--config").unwrap() + 1;
    let (mount, key) = args[at].rsplit_once('/').unwrap();
    assert_eq!(mount_of(pod, sidecar, "configMap", "api-sidecar"), mount);
    assert_eq!(
        env_value(sidecar, "POD_IP").unwrap()["valueFrom"]["fieldRef"]["fieldPath"],
        "status.podIP"
    );
    let configmap = doc(docs, "ConfigMap", "api-sidecar");
    let template = str_of(&configmap["data"][key]).to_owned();
    assert!(template.contains("${POD_IP}"), "{template}");
    let file = dir.join(key);
    fs::write(&file, &template).unwrap();
    args[at] = file.display().to_string();
    args.push("--check".into());
    assert_eq!(
        env_value(sidecar, "POD_NAME").unwrap()["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.name"
    );
    assert_eq!(
        env_value(sidecar, "SIDEWALL_CA_FINGERPRINT").unwrap()["valueFrom"]["configMapKeyRef"],
        serde_json::json!({"name": "sidewall-ca", "key": "fingerprint"})
    );
    let run = |pod_ip: Option<&str>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_sidewall"));
        command
            .args(&args)
            .env_remove("POD_IP")
            .env("POD_NAME", POD_NAME)
            .env("SIDEWALL_CA_FINGERPRINT", FINGERPRINT);
        if let Some(ip) = pod_ip {
            command.env("POD_IP", ip);
        }
        command.output().unwrap()
    };
    let output = run(Some(POD_IP));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "the sidecar's command failed:\n{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let unset = run(None);
    let stderr = String::from_utf8_lossy(&unset.stderr);
    assert_eq!(unset.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("environment variable POD_IP is not set"),
        "{stderr}"
    );
    let rendered = dir.join("rendered.yaml");
    fs::write(
        &rendered,
        template
            .replace("${POD_IP}", POD_IP)
            .replace("${POD_NAME}", POD_NAME)
            .replace("${SIDEWALL_CA_FINGERPRINT}", FINGERPRINT),
    )
    .unwrap();
    (rendered, stdout)
}

#[test]
fn kubernetes_api_workload_sidecar_config_checks_with_the_pod_ip_and_matches_the_pod() {
    let Some(docs) = rendered("api") else {
        return;
    };
    let deployment = doc(&docs, "Deployment", "api");
    let pod = pod_spec(deployment);
    // A native sidecar: an init container that keeps running, after the rules, before the app,
    // which starts once the sidecar is ready.
    let sidecar = container(&pod["initContainers"], "sidewall");
    assert_eq!(sidecar["restartPolicy"], "Always");
    assert_eq!(sidecar["startupProbe"]["httpGet"]["path"], "/ready");
    let order: Vec<&str> = pod["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| str_of(&c["name"]))
        .collect();
    assert_eq!(order, ["sidewall-iptables", "sidewall"]);
    let temp = tempfile::tempdir().unwrap();
    let (rendered, stdout) = check_kubernetes_sidecar_config(&docs, sidecar, pod, temp.path());
    assert!(
        stdout.contains("OK: spiffe://sidewall.local/ns/demo/svc/api")
            && stdout.contains("transparent mode"),
        "{stdout}"
    );
    let config = &parse_yaml(&rendered).unwrap()[0];
    assert_eq!(
        config["inbound"]["advertise"],
        format!("{POD_IP}:{}", port_of(&config["inbound"]["listen"]))
    );

    // The sidecar's own UID, the one the init container's rules exempt.
    let security = &sidecar["securityContext"];
    assert_eq!(security["runAsUser"], 65532);
    assert_eq!(security["runAsGroup"], 65532);
    assert_eq!(security["runAsNonRoot"], true);
    // The state directory is an emptyDir; the token file is in the Secret's mount.
    let state_volume = pod["volumes"].as_array().unwrap().iter().find(|v| {
        v.get("emptyDir").is_some() && {
            sidecar["volumeMounts"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["name"] == v["name"] && m["mountPath"] == config["stateDir"])
        }
    });
    assert!(state_volume.is_some(), "stateDir is not an emptyDir mount");
    // The token file is the projected service-account token for the audience `sidewall`, of
    // the pod's own service account, and the pod mounts no Kubernetes API token.
    let projected = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v.get("projected").is_some())
        .expect("a projected volume");
    let source = &projected["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(source["audience"], "sidewall");
    let token_mount = sidecar["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == projected["name"])
        .expect("the token is mounted into the sidecar");
    assert_eq!(
        config["controlPlane"]["serviceAccountTokenFile"],
        format!(
            "{}/{}",
            str_of(&token_mount["mountPath"]),
            str_of(&source["path"])
        )
    );
    assert_eq!(config["controlPlane"]["pod"], POD_NAME);
    assert_eq!(config["controlPlane"]["caFingerprint"], FINGERPRINT);
    assert_eq!(pod["automountServiceAccountToken"], false);
    let account = str_of(&pod["serviceAccountName"]);
    doc(&docs, "ServiceAccount", account);
    assert_eq!(
        config["identity"],
        format!("spiffe://sidewall.local/ns/demo/svc/{account}"),
        "the identity the control plane maps the service account to"
    );
    // The kubelet probes the sidecar on its admin listener.
    let admin_port = port_of(&config["admin"]["listen"]);
    assert_eq!(sidecar["readinessProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(sidecar["readinessProbe"]["httpGet"]["port"], admin_port);
    assert_eq!(sidecar["livenessProbe"]["httpGet"]["port"], admin_port);

    // The init container: `sidewall iptables install`, NET_ADMIN and NET_RAW only.
    let init = container(&pod["initContainers"], "sidewall-iptables");
    let command = strings(&init["command"]);
    assert_eq!(command[..3], ["sidewall", "iptables", "install"]);
    let capabilities = &init["securityContext"]["capabilities"];
    assert_eq!(strings(&capabilities["add"]), ["NET_ADMIN", "NET_RAW"]);
    assert_eq!(strings(&capabilities["drop"]), ["ALL"]);
    let flag = |name: &str| {
        let i = command.iter().position(|a| a == name);
        i.map(|i| command[i + 1].clone())
    };
    assert_eq!(flag("--proxy-uid").as_deref(), Some("65532"));

    // Its rules, as it would install them: to the sidecar's listeners, never the sidecar's
    // own ports or the app's probe ports, and the sidecar's UID exempt.
    let mut dry_run = command[1..].to_vec();
    dry_run.push("--dry-run".into());
    let run = sidewall(&dry_run);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let rules = run.stdout;
    let inbound = port_of(&config["inbound"]["listen"]);
    let outbound = port_of(&config["outbound"]["transparent"]["listen"]);
    for rule in [
        format!("-A SIDEWALL_INBOUND -p tcp -j REDIRECT --to-ports {inbound}"),
        format!("-A SIDEWALL_REDIRECT -p tcp -j REDIRECT --to-ports {outbound}"),
        format!("-A SIDEWALL_INBOUND -p tcp --dport {inbound} -j RETURN"),
        format!("-A SIDEWALL_INBOUND -p tcp --dport {admin_port} -j RETURN"),
        "-A SIDEWALL_OUTBOUND -m owner --uid-owner 65532 -j RETURN".to_owned(),
    ] {
        assert!(rules.contains(&rule), "no `{rule}` in:\n{rules}");
    }
    let mut probe_ports = 0;
    for app in pod["containers"].as_array().unwrap() {
        if app["name"] == "sidewall" {
            continue;
        }
        assert_ne!(
            app["securityContext"]["runAsUser"], 65532,
            "the app must not run as the sidecar's UID"
        );
        for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
            let Some(port) = app[probe]["httpGet"]["port"].as_u64() else {
                continue;
            };
            probe_ports += 1;
            let rule = format!("-A SIDEWALL_INBOUND -p tcp --dport {port} -j RETURN");
            assert!(
                rules.contains(&rule),
                "the kubelet's probe port {port} is redirected:\n{rules}"
            );
        }
    }
    assert!(probe_ports > 0, "the app has no HTTP probe");

    // The Service's virtual IP and port are registered by the sidecar, and lead to an app
    // port the sidecar serves.
    let service = doc(&docs, "Service", "api");
    let cluster_ip = str_of(&service["spec"]["clusterIP"]);
    let served: Vec<u64> = config["inbound"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["port"].as_u64().unwrap())
        .collect();
    let addresses = strings(&config["inbound"]["addresses"]);
    for port in service["spec"]["ports"].as_array().unwrap() {
        let number = port["port"].as_u64().unwrap();
        assert_eq!(port["targetPort"], number, "Service port != app port");
        assert!(
            served.contains(&number),
            "the sidecar does not serve {number}"
        );
        assert!(
            addresses.contains(&format!("{cluster_ip}:{number}")),
            "{cluster_ip}:{number} is not in inbound.addresses {addresses:?}"
        );
    }
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    for (key, value) in service["spec"]["selector"].as_object().unwrap() {
        assert_eq!(&labels[key], value, "the Service does not select the pod");
    }
}

#[test]
fn compose_sidecar_configs_check_and_match_compose_yaml() {
    let dir = examples().join("compose");
    let configs = yaml_files(&dir.join("config"));
    assert_eq!(configs.len(), 3, "{configs:?}");
    for file in &configs {
        assert_sidecar_config_checks(file);
    }

    let Some(docs) = yaml_docs(&dir.join("compose.yaml")) else {
        return;
    };
    let services = docs[0]["services"].as_object().unwrap();
    assert!(dir.join("../three-tier/policies").is_dir());
    let cp_volumes = strings(&services["control-plane"]["volumes"]);
    assert!(
        cp_volumes.contains(&"../three-tier/policies:/etc/sidewall/policies:ro".to_owned()),
        "{cp_volumes:?}"
    );

    let mut app_ips = BTreeMap::new();
    for file in &configs {
        let name = file.file_stem().unwrap().to_string_lossy().into_owned();
        let config = &parse_yaml(file).unwrap()[0];
        let app = &services[&name];
        let ip = str_of(&app["networks"]["mesh"]["ipv4_address"]);
        assert_eq!(
            config["inbound"]["advertise"],
            format!("{ip}:{}", port_of(&config["inbound"]["listen"])),
            "{name}: inbound.advertise is not the app container's IP"
        );
        assert_eq!(
            config["identity"],
            format!("spiffe://sidewall.local/ns/demo/svc/{name}")
        );
        let served: Vec<u64> = config["inbound"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["port"].as_u64().unwrap())
            .collect();
        app_ips.insert(ip.to_owned(), served);

        // The sidecar: in the app's namespace, as the image's UID (65532), with this config and
        // its token.
        let sidecar = &services[&format!("{name}-sidecar")];
        assert_eq!(sidecar["network_mode"], format!("service:{name}"));
        assert!(
            sidecar["user"].is_null(),
            "{name}-sidecar: runs as the image's user"
        );
        let volumes = strings(&sidecar["volumes"]);
        let config_mount = format!("./config/{name}.yaml:");
        let mounted = volumes
            .iter()
            .find(|v| v.starts_with(&config_mount))
            .unwrap_or_else(|| panic!("{name}-sidecar does not mount config/{name}.yaml"));
        let inside = mounted.split(':').nth(1).unwrap();
        let command = strings(&sidecar["command"]);
        assert_eq!(command, ["proxy", "--config", inside]);
        assert!(
            volumes
                .iter()
                .any(|v| v.ends_with(&format!(":{}", str_of(&config["stateDir"])))),
            "{name}: stateDir is not a volume"
        );
        let secret = &sidecar["secrets"][0];
        assert_eq!(
            config["controlPlane"]["tokenFile"],
            format!("/run/secrets/{}", str_of(&secret["target"]))
        );
        assert!(docs[0]["secrets"][str_of(&secret["source"])]["file"].is_string());

        // The one-shot: in the same namespace, as root with NET_ADMIN and NET_RAW only, and
        // rules that exempt UID 65532 and redirect to this sidecar's listeners.
        let init = &services[&format!("{name}-iptables")];
        assert_eq!(init["network_mode"], format!("service:{name}"));
        assert_eq!(strings(&init["cap_drop"]), ["ALL"]);
        assert_eq!(strings(&init["cap_add"]), ["NET_ADMIN", "NET_RAW"]);
        let mut args = strings(&init["command"]);
        assert_eq!(args[..2], ["iptables", "install"]);
        args.push("--dry-run".to_owned());
        let run = sidewall(&args);
        assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
        let inbound = port_of(&config["inbound"]["listen"]);
        let outbound = port_of(&config["outbound"]["transparent"]["listen"]);
        for rule in [
            format!("-j REDIRECT --to-ports {inbound}"),
            format!("-j REDIRECT --to-ports {outbound}"),
            "--uid-owner 65532 -j RETURN".to_owned(),
        ] {
            assert!(run.stdout.contains(&rule), "{name}: no `{rule}`");
        }
        let depends = sidecar["depends_on"][format!("{name}-iptables")]["condition"].clone();
        assert_eq!(depends, "service_completed_successfully");
        let depends = sidecar["depends_on"]["control-plane"]["condition"].clone();
        assert_eq!(depends, "service_healthy");
    }

    // What the demo apps call is a service in the mesh, on a port its sidecar serves.
    for (name, service) in services {
        let command = service["command"].as_array().cloned().unwrap_or_default();
        for arg in command.iter().filter_map(Value::as_str) {
            let Some((_, url)) = arg.split_once('=') else {
                continue;
            };
            let Some(address) = url
                .strip_prefix("http://")
                .or_else(|| url.strip_prefix("tcp://"))
            else {
                continue;
            };
            let address = address.split(['/', '@']).next().unwrap();
            let (ip, port) = address.rsplit_once(':').unwrap();
            let served = app_ips
                .get(ip)
                .unwrap_or_else(|| panic!("{name} calls {address}: no service has that IP"));
            assert!(
                served.contains(&port.parse().unwrap()),
                "{name} calls {address}: its sidecar does not serve that port"
            );
        }
    }
}

#[test]
fn systemd_units_verify_and_the_example_sidecar_config_checks() {
    let dir = examples().join("systemd");
    let stdout = assert_sidecar_config_checks(&dir.join("api.yaml"));
    assert!(stdout.contains("transparent mode"), "{stdout}");
    let config = fs::read_to_string(dir.join("api.yaml")).unwrap();
    let proxy_unit = fs::read_to_string(dir.join("sidewall-proxy@.service")).unwrap();
    // The unit hands the token over as a credential where the config looks for it, and keeps
    // the state in its StateDirectory.
    assert!(proxy_unit.contains("LoadCredential=token:/etc/sidewall/%i.token"));
    assert!(config.contains("tokenFile: /run/credentials/sidewall-proxy@api.service/token"));
    assert!(proxy_unit.contains("StateDirectory=sidewall-proxy/%i"));
    assert!(config.contains("stateDir: /var/lib/sidewall-proxy/api"));
    assert!(
        proxy_unit
            .contains("ExecStart=/usr/local/bin/sidewall proxy --config /etc/sidewall/%i.yaml")
    );

    let units: Vec<PathBuf> = {
        let mut units: Vec<PathBuf> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "service"))
            .collect();
        units.sort();
        units
    };
    assert_eq!(units.len(), 3, "{units:?}");

    let available = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !available {
        eprintln!("SKIPPED: systemd-analyze not installed (the units were not verified)");
        return;
    }
    // `verify` checks that each ExecStart= binary exists: point them at the one just built.
    let temp = tempfile::tempdir().unwrap();
    let mut copies = Vec::new();
    for unit in &units {
        let text = fs::read_to_string(unit)
            .unwrap()
            .replace("/usr/local/bin/sidewall", env!("CARGO_BIN_EXE_sidewall"));
        let copy = temp.path().join(unit.file_name().unwrap());
        fs::write(&copy, text).unwrap();
        copies.push(copy);
    }
    for copy in &copies {
        let output = Command::new("systemd-analyze")
            .arg("verify")
            .arg(copy)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        // Only what concerns our units: the host's own units may have warnings of their own.
        let ours: Vec<&str> = stderr.lines().filter(|l| l.contains("sidewall")).collect();
        assert!(
            output.status.success() && ours.is_empty(),
            "systemd-analyze verify {}:\n{stderr}",
            copy.display()
        );
    }
}

#[test]
fn kubernetes_replicated_control_plane_runs_over_the_etcd_statefulset_with_the_kek_secret() {
    let Some(docs) = rendered("control-plane-etcd") else {
        return;
    };
    let etcd = doc(&docs, "StatefulSet", "sidewall-etcd");
    let members = etcd["spec"]["replicas"].as_u64().unwrap();
    assert_eq!(members, 3);
    let service = str_of(&etcd["spec"]["serviceName"]);
    assert_eq!(doc(&docs, "Service", service)["spec"]["clusterIP"], "None");
    let deployment = doc(&docs, "Deployment", "sidewall-control-plane");
    assert_eq!(deployment["spec"]["replicas"], 3);
    let pod = pod_spec(deployment);
    let cp = container(&pod["containers"], "control-plane");
    let command = strings(&cp["command"]);
    let flag = |name: &str| {
        let at = command.iter().position(|a| a == name).unwrap();
        command[at + 1].clone()
    };
    // The store lists every member by its stable StatefulSet name.
    let expected: Vec<String> = (0..members)
        .map(|i| format!("sidewall-etcd-{i}.{service}:2379"))
        .collect();
    assert_eq!(flag("--store"), format!("etcd://{}", expected.join(",")));
    // The overlay took out what one replica on the embedded store needs and three must not
    // share: the volume, and the policy directory every replica would apply.
    assert!(
        !command.iter().any(|a| a == "--policies-dir"),
        "{command:?}"
    );
    assert!(
        !docs.iter().any(|d| d["kind"] == "PersistentVolumeClaim"),
        "the overlay still has the PersistentVolumeClaim"
    );
    let configmaps: Vec<&str> = docs
        .iter()
        .filter(|d| d["kind"] == "ConfigMap")
        .map(|d| str_of(&d["metadata"]["name"]))
        .collect();
    assert_eq!(
        configmaps,
        ["sidewall-control-plane-config"],
        "no policy ConfigMap"
    );
    assert!(
        pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v.get("persistentVolumeClaim").is_none()
                && v["configMap"]["name"] != "sidewall-policies")
    );
    // Service-account attestation, as in the base.
    let config = check_attestation_config(&docs, pod, cp, &command);
    // The KEK file is in the Secret's mount, readable by the pod's group only.
    let kek = flag("--ca-kek-file");
    let mount = mount_of(pod, cp, "secret", "sidewall-ca-kek");
    assert_eq!(kek, format!("{mount}/ca.kek"));
    let secret = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["secret"]["secretName"] == "sidewall-ca-kek")
        .unwrap();
    assert_eq!(secret["secret"]["defaultMode"], 0o440);
    assert_eq!(pod["securityContext"]["fsGroup"], 65532);
    for name in ["sidewall-etcd", "sidewall-control-plane"] {
        assert_eq!(
            doc(&docs, "PodDisruptionBudget", name)["spec"]["minAvailable"],
            2
        );
    }

    // The command as written is accepted: with a KEK file and a scratch data directory it gets
    // as far as dialling etcd (no such names here), and fails before binding anything.
    let temp = tempfile::tempdir().unwrap();
    let kek_file = sidewall_control_plane::testing::kek_file(temp.path());
    let config_file = temp.path().join("control-plane.yaml");
    fs::write(&config_file, config).unwrap();
    let mut args: Vec<String> = command[1..].to_vec();
    for arg in &mut args {
        if *arg == kek {
            *arg = kek_file.display().to_string();
        } else if arg == "/var/lib/sidewall" {
            *arg = temp.path().join("data").display().to_string();
        } else if arg.ends_with("/control-plane.yaml") {
            *arg = config_file.display().to_string();
        }
    }
    let run = Command::new(env!("CARGO_BIN_EXE_sidewall"))
        .args(&args)
        .env(
            "SIDEWALL_K8S_ISSUER",
            "https://kubernetes.default.svc.cluster.local",
        )
        .output()
        .unwrap();
    let run = support::Run {
        code: run.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&run.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&run.stderr).into_owned(),
    };
    if cfg!(feature = "etcd") {
        assert_eq!(run.code, 1, "{}", run.stderr);
        assert!(
            run.stderr
                .contains(&format!("cannot reach etcd at {}", expected.join(","))),
            "{}",
            run.stderr
        );
    } else {
        // A build without the etcd store says so, and how to get one, before anything else.
        assert_eq!(run.code, 2, "{}", run.stderr);
        assert!(
            run.stderr.contains("built without the etcd store"),
            "{}",
            run.stderr
        );
    }
}
