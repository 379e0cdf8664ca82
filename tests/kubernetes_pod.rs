//! The Kubernetes install run under Docker, as far as a machine without a cluster can take it.
//!
//! `kubectl kustomize` renders `examples/kubernetes/control-plane` and `examples/kubernetes/api`
//! (what `kubectl apply -k` applies), and every container of the two pods runs on the image
//! `scripts/image` builds, exactly as the rendered manifest gives it: `command` as the
//! entrypoint, then the arguments; the environment, with the downward API's `status.podIP` as the
//! pod's address; the user, group and the pod's `fsGroup`; the capabilities; a read-only root
//! filesystem; no privilege escalation; the memory limit; and the volumes. ConfigMaps and Secrets
//! are laid out as the kubelet writes them (files linked through `..data` into a timestamped
//! directory, the Secret's `defaultMode`, the `fsGroup` as their group); an `emptyDir` and the
//! claim are directories of the pod's group.
//!
//! The test plays the kubelet, in its order: a pause container holds the pod's network
//! namespace; init containers run to completion (exit 0); a native sidecar (`restartPolicy:
//! Always`) must pass its startup probe before the next container starts; then every readiness
//! and liveness probe must pass, as HTTP GETs to the pod's address on the probe's port, named or
//! numbered, within the probe's own period and failure threshold. The control plane's Service
//! name is a network alias of its pod. Anything in the manifests the test does not know how to
//! run fails it, so the manifests cannot move away from what is run here.
//!
//! Projected service-account tokens are signed by a test issuer (an ES256 key) for the pod's
//! namespace, service account and name, with the volume's audience and expiry, as the kubelet
//! asks the API server for them; the issuer's URL and keys are the ConfigMap the README's first
//! step creates.
//!
//! Then what the README promises: its fingerprint step works through `docker exec` (the CLI finds
//! the data directory by `SIDEWALL_DATA_DIR`); the api's sidecar joins with its pod's
//! service-account token, registers the pod's IP and becomes ready; the control plane applied the policy ConfigMap as
//! `gitops:/etc/sidewall/policies`; a caller's sidecar (the frontend's identity, on the same
//! network) gets `GET /v1/orders` through while `DELETE` is refused by policy and never reaches
//! the app; a plaintext client on the network reaches neither the app port nor the mTLS port.
//! Needs Docker (`SKIPPED` without it, a failure with `SIDEWALL_REQUIRE_DOCKER` set, as in CI)
//! and kubectl (`scripts/test-deps`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // test: panics report failures; blocking waits are fine

mod support;

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{PermissionsExt, chown, symlink};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;
use sidewall_control_plane::testing::TestIssuer;
use support::output_text as text;

const IMAGE_IN_MANIFESTS: &str = "sidewall:0.1.0";
const TD: &str = "spiffe://sidewall.local/ns/demo/svc";
const CONTROL_PLANE_SERVICE: &str = "sidewall-control-plane.sidewall-system.svc.cluster.local";

fn docker(args: &[&str]) -> Output {
    Command::new("docker").args(args).output().unwrap()
}

fn docker_ok(args: &[&str]) -> String {
    let run = docker(args);
    assert!(run.status.success(), "docker {args:?}: {}", text(&run));
    String::from_utf8_lossy(&run.stdout).trim().to_owned()
}

/// The objects `kubectl apply -k examples/kubernetes/NAME` applies, as JSON.
fn rendered(name: &str) -> Vec<Value> {
    support::kustomize(name)
        .split("\n---\n")
        .map(|doc| serde_yaml::from_str::<Value>(doc).unwrap())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the rendered manifests"))
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|list| {
            list.iter()
                .map(|v| v.as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Fails on a key the test does not know how to run: the manifests may only use what is tested.
fn only_keys(object: &Value, known: &[&str], what: &str) {
    if let Some(map) = object.as_object() {
        for key in map.keys() {
            assert!(
                known.contains(&key.as_str()),
                "{what} has `{key}`, which this test does not run; teach it, or it is untested"
            );
        }
    }
}

/// An HTTP/1.0 request to `ip:port`: the status, or `None` when nothing HTTP answered.
fn http(ip: &str, port: u16, method: &str, path: &str) -> Option<(u16, String)> {
    let mut stream = std::net::TcpStream::connect_timeout(
        &format!("{ip}:{port}").parse().unwrap(),
        Duration::from_secs(2),
    )
    .ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "{method} {path} HTTP/1.0\r\nHost: {ip}\r\n\r\n").ok()?;
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    let status = answer.strip_prefix("HTTP/1.")?.get(2..5)?.parse().ok()?;
    let body = answer.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((status, body))
}

/// The Docker side of the test: the image, the network, and every container and pod started,
/// all removed when dropped.
struct Cluster {
    prefix: String,
    image: String,
    network: String,
    containers: Vec<String>,
    dirs: tempfile::TempDir,
    /// The cluster's service-account issuer: the key the kubelet's tokens are signed with.
    issuer: TestIssuer,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let quiet = |args: &[&str]| {
            let _ = Command::new("docker").args(args).output();
        };
        if !self.containers.is_empty() {
            let mut args = vec!["rm", "-f", "-v"];
            args.extend(self.containers.iter().map(String::as_str));
            quiet(&args);
        }
        quiet(&["network", "rm", &self.network]);
        quiet(&["rmi", "-f", &self.image]);
    }
}

/// A pod as the test runs it: its address and its containers by name.
struct Pod {
    name: String,
    ip: String,
    containers: BTreeMap<String, String>,
    volumes: PathBuf,
}

impl Pod {
    fn exec(&self, container: &str, args: &[&str]) -> Output {
        let mut all = vec!["exec", &self.containers[container]];
        all.extend_from_slice(args);
        docker(&all)
    }
}

/// A volume's directory as the kubelet leaves it: a directory of the pod's group.
fn pod_directory(path: &Path, mode: u32, fs_group: Option<u32>) {
    fs::create_dir_all(path).unwrap();
    chown(path, Some(0), fs_group).expect("chown (the test runs as root, as CI does)");
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// A ConfigMap or Secret volume as the kubelet's atomic writer lays it out: the files in a
/// timestamped directory, `..data` linking to it, and one link per key through `..data`.
fn projected(path: &Path, files: &BTreeMap<String, String>, mode: u32, fs_group: Option<u32>) {
    pod_directory(path, 0o755, fs_group);
    let stamp = "..2026_12_07_00_00_00.000000001";
    pod_directory(&path.join(stamp), 0o755, fs_group);
    for (key, content) in files {
        let file = path.join(stamp).join(key);
        fs::write(&file, content).unwrap();
        chown(&file, Some(0), fs_group).unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(mode)).unwrap();
        symlink(format!("..data/{key}"), path.join(key)).unwrap();
    }
    symlink(stamp, path.join("..data")).unwrap();
}

/// `100Mi` as Docker writes it.
fn memory(quantity: &str) -> String {
    if let Some(mebibytes) = quantity.strip_suffix("Mi") {
        format!("{mebibytes}m")
    } else if let Some(gibibytes) = quantity.strip_suffix("Gi") {
        format!("{gibibytes}g")
    } else {
        panic!("memory quantity {quantity}: teach the test its unit")
    }
}

/// A probe's port: a number, or the name of one of the container's ports.
fn probe_port(container: &Value, port: &Value) -> u16 {
    if let Some(number) = port.as_u64() {
        return u16::try_from(number).unwrap();
    }
    let name = port.as_str().unwrap();
    container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .and_then(|p| p["containerPort"].as_u64())
        .map(|p| u16::try_from(p).unwrap())
        .unwrap_or_else(|| panic!("probe port {name} is none of the container's ports"))
}

impl Cluster {
    fn new() -> Self {
        let prefix = format!("sidewall-k8s-{}", std::process::id());
        let image = format!("{prefix}:test");
        support::build_image(&image);
        let network = prefix.clone();
        let cluster = Cluster {
            prefix,
            image,
            network,
            containers: Vec::new(),
            dirs: tempfile::tempdir().unwrap(),
            issuer: TestIssuer::new("cluster-signing-key"),
        };
        docker_ok(&["network", "create", &cluster.network]);
        cluster
    }

    /// Starts `docker run ARGS` detached (or waits for it with `wait`), remembering the
    /// container for removal. Returns its name and, when waited for, its output.
    fn run(&mut self, name: &str, args: &[String], wait: bool) -> (String, Option<Output>) {
        let name = format!("{}-{name}", self.prefix);
        self.containers.push(name.clone());
        let mut all: Vec<String> = vec!["run".into(), "--name".into(), name.clone()];
        if !wait {
            all.push("-d".into());
        }
        all.extend_from_slice(args);
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        if wait {
            return (name, Some(docker(&all)));
        }
        docker_ok(&all);
        (name, None)
    }

    /// What every container's logs say, for a failure message.
    fn logs(&self) -> String {
        let mut said = String::new();
        for name in &self.containers {
            let logs = docker(&["logs", "--tail", "15", name]);
            said.push_str(&format!("--- {name}\n{}", text(&logs)));
        }
        said
    }

    /// The pod's network namespace, held by an idle process (the kubelet's pause container),
    /// with `aliases` as names on the network.
    fn pause(&mut self, pod: &str, aliases: &[&str]) -> (String, String) {
        let mut args: Vec<String> = vec!["--network".into(), self.network.clone()];
        for alias in aliases {
            args.extend(["--network-alias".into(), (*alias).to_owned()]);
        }
        args.extend(
            [
                "--user",
                "65535:65535",
                "--read-only",
                "--cap-drop",
                "ALL",
                "--tmpfs",
                "/tmp",
                "--entrypoint",
                "sidewall",
                &self.image,
                "demo-app",
                "--name",
                "pause",
                "--serve",
                "tcp:127.0.0.1:65500",
                "--stats",
                "/tmp/pause.json",
            ]
            .map(str::to_owned),
        );
        let (name, _) = self.run(&format!("{pod}-pause"), &args, false);
        let ip = docker_ok(&[
            "inspect",
            "-f",
            "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
            &name,
        ]);
        (name, ip)
    }

    /// Runs the Deployment `deployment` of `docs` as pod `pod`, the kubelet's way. `created`
    /// gives the data of the ConfigMaps and Secrets the README's steps create with kubectl,
    /// not in `docs` (name, then key and value).
    fn start_pod(
        &mut self,
        docs: &[Value],
        deployment: &str,
        aliases: &[&str],
        created: &BTreeMap<&str, BTreeMap<String, String>>,
    ) -> Pod {
        let object = find(docs, "Deployment", deployment);
        let namespace = object["metadata"]["namespace"].as_str().unwrap().to_owned();
        let spec = &object["spec"]["template"]["spec"];
        only_keys(
            spec,
            &[
                "serviceAccountName",
                "automountServiceAccountToken",
                "securityContext",
                "initContainers",
                "containers",
                "volumes",
                "terminationGracePeriodSeconds",
                "affinity",
            ],
            "the pod spec",
        );
        assert_eq!(
            spec["automountServiceAccountToken"], false,
            "the Kubernetes API token would be mounted; this test mounts none"
        );
        let account = spec["serviceAccountName"].as_str().unwrap_or("default");
        if account != "default" {
            let object = find(docs, "ServiceAccount", account);
            assert_eq!(object["metadata"]["namespace"], namespace.as_str());
        }
        // A ConfigMap's data: from the manifests, or one a README step created.
        let configmap_data = |source: &str| -> BTreeMap<String, String> {
            match docs
                .iter()
                .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == source)
            {
                Some(configmap) => {
                    assert_eq!(configmap["metadata"]["namespace"], namespace.as_str());
                    configmap["data"]
                        .as_object()
                        .unwrap()
                        .iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
                        .collect()
                }
                None => created
                    .get(source)
                    .unwrap_or_else(|| panic!("the pod uses the ConfigMap {source}, not given"))
                    .clone(),
            }
        };
        let pod_security = &spec["securityContext"];
        only_keys(
            pod_security,
            &[
                "runAsNonRoot",
                "runAsUser",
                "runAsGroup",
                "fsGroup",
                "fsGroupChangePolicy",
                "seccompProfile",
            ],
            "the pod's securityContext",
        );
        if !pod_security["seccompProfile"].is_null() {
            // Docker's default profile is the runtime's default.
            assert_eq!(pod_security["seccompProfile"]["type"], "RuntimeDefault");
        }
        let fs_group = pod_security["fsGroup"].as_u64().map(|g| g as u32);
        let name = format!("{deployment}-0");
        let (pause, ip) = self.pause(&name, aliases);

        // The volumes, on the host, shared by the pod's containers.
        let volumes = self.dirs.path().join(&name);
        let mut mounts: BTreeMap<String, PathBuf> = BTreeMap::new();
        for volume in spec["volumes"].as_array().unwrap() {
            let volume_name = volume["name"].as_str().unwrap();
            let path = volumes.join(volume_name);
            only_keys(
                volume,
                &[
                    "name",
                    "configMap",
                    "secret",
                    "projected",
                    "emptyDir",
                    "persistentVolumeClaim",
                ],
                "a volume",
            );
            if let Some(map) = volume["configMap"].as_object() {
                let files = configmap_data(map["name"].as_str().unwrap());
                projected(&path, &files, 0o644, fs_group);
            } else if let Some(sources) = volume["projected"].as_object() {
                // Service-account tokens only, signed by the cluster's issuer for this pod.
                only_keys(
                    &volume["projected"],
                    &["sources", "defaultMode"],
                    "a projected volume",
                );
                let mut files = BTreeMap::new();
                for source in sources["sources"].as_array().unwrap() {
                    only_keys(source, &["serviceAccountToken"], "a projected source");
                    let token = &source["serviceAccountToken"];
                    only_keys(token, &["audience", "expirationSeconds", "path"], "a token");
                    let jwt = self.issuer.token(
                        &namespace,
                        account,
                        &name,
                        token["audience"].as_str().unwrap(),
                        token["expirationSeconds"].as_u64().unwrap_or(3600),
                    );
                    files.insert(token["path"].as_str().unwrap().to_owned(), jwt);
                }
                let mode = sources
                    .get("defaultMode")
                    .and_then(Value::as_u64)
                    .unwrap_or(0o644) as u32;
                projected(&path, &files, mode, fs_group);
            } else if let Some(secret) = volume["secret"].as_object() {
                let source = secret["secretName"].as_str().unwrap();
                let files = created
                    .get(source)
                    .unwrap_or_else(|| panic!("the pod mounts the Secret {source}, not given"));
                let mode = secret
                    .get("defaultMode")
                    .and_then(Value::as_u64)
                    .unwrap_or(0o644) as u32;
                projected(&path, files, mode, fs_group);
            } else if volume["emptyDir"].is_object() {
                pod_directory(&path, 0o2777, fs_group);
            } else if volume["persistentVolumeClaim"].is_object() {
                let claim = volume["persistentVolumeClaim"]["claimName"]
                    .as_str()
                    .unwrap();
                find(docs, "PersistentVolumeClaim", claim);
                pod_directory(&path, 0o2770, fs_group);
            }
            mounts.insert(volume_name.to_owned(), path);
        }

        let grace = spec["terminationGracePeriodSeconds"]
            .as_u64()
            .unwrap_or(30)
            .to_string();
        let mut pod = Pod {
            name: name.clone(),
            ip: ip.clone(),
            containers: BTreeMap::new(),
            volumes,
        };
        let image = self.image.clone();
        let docker_args = |container: &Value| -> Vec<String> {
            let what = format!("container {}", container["name"]);
            only_keys(
                container,
                &[
                    "name",
                    "image",
                    "command",
                    "args",
                    "env",
                    "ports",
                    "startupProbe",
                    "livenessProbe",
                    "readinessProbe",
                    "resources",
                    "securityContext",
                    "volumeMounts",
                    "restartPolicy",
                ],
                &what,
            );
            assert_eq!(container["image"], IMAGE_IN_MANIFESTS, "{what}");
            let mut args: Vec<String> = vec![
                "--network".into(),
                format!("container:{pause}"),
                "--stop-timeout".into(),
                grace.clone(),
            ];
            // User and groups: the container's securityContext over the pod's.
            let security = &container["securityContext"];
            only_keys(
                security,
                &[
                    "runAsUser",
                    "runAsGroup",
                    "runAsNonRoot",
                    "allowPrivilegeEscalation",
                    "readOnlyRootFilesystem",
                    "capabilities",
                ],
                &format!("{what}'s securityContext"),
            );
            let field = |key: &str| {
                if security[key].is_null() {
                    pod_security[key].clone()
                } else {
                    security[key].clone()
                }
            };
            if let Some(user) = field("runAsUser").as_u64() {
                let user = match field("runAsGroup").as_u64() {
                    Some(group) => format!("{user}:{group}"),
                    None => user.to_string(),
                };
                args.extend(["--user".into(), user]);
            }
            if field("runAsNonRoot") == true {
                // The kubelet refuses to start it as root; the image's user is 65532.
                assert_ne!(field("runAsUser").as_u64(), Some(0), "{what}");
            }
            if let Some(group) = fs_group {
                args.extend(["--group-add".into(), group.to_string()]);
            }
            if security["readOnlyRootFilesystem"] == true {
                args.push("--read-only".into());
            }
            if security["allowPrivilegeEscalation"] == false {
                args.extend(["--security-opt".into(), "no-new-privileges".into()]);
            }
            let capabilities = &security["capabilities"];
            only_keys(capabilities, &["drop", "add"], &what);
            for drop in strings(&capabilities["drop"]) {
                args.extend(["--cap-drop".into(), drop]);
            }
            for add in strings(&capabilities["add"]) {
                args.extend(["--cap-add".into(), add]);
            }
            if let Some(limit) = container["resources"]["limits"]["memory"].as_str() {
                args.extend(["--memory".into(), memory(limit)]);
            }
            // The environment, the downward API resolved as the kubelet does.
            for variable in container["env"].as_array().into_iter().flatten() {
                let variable_name = variable["name"].as_str().unwrap();
                let value = if let Some(value) = variable["value"].as_str() {
                    value.to_owned()
                } else if let Some(key) = variable["valueFrom"]["configMapKeyRef"].as_object() {
                    let data = configmap_data(key["name"].as_str().unwrap());
                    data[key["key"].as_str().unwrap()].clone()
                } else {
                    match variable["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                        Some("status.podIP") => ip.clone(),
                        Some("metadata.name") => name.to_owned(),
                        Some("metadata.namespace") => namespace.clone(),
                        other => {
                            panic!("{what}: env {variable_name} from {other:?}: teach the test")
                        }
                    }
                };
                args.extend(["--env".into(), format!("{variable_name}={value}")]);
            }
            for mount in container["volumeMounts"].as_array().into_iter().flatten() {
                only_keys(mount, &["name", "mountPath", "readOnly"], &what);
                let host = &mounts[mount["name"].as_str().unwrap()];
                let read_only = mount["readOnly"] == true;
                args.extend([
                    "--volume".into(),
                    format!(
                        "{}:{}{}",
                        host.display(),
                        mount["mountPath"].as_str().unwrap(),
                        if read_only { ":ro" } else { "" }
                    ),
                ]);
            }
            // `command` replaces the image's entrypoint; `args` follow it.
            let command = strings(&container["command"]);
            assert!(!command.is_empty(), "{what}: no command");
            args.extend(["--entrypoint".into(), command[0].clone()]);
            args.push(image.clone());
            args.extend(command[1..].iter().cloned());
            args.extend(strings(&container["args"]));
            args
        };

        let init: Vec<Value> = spec["initContainers"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let main = spec["containers"].as_array().unwrap().clone();
        for container in &init {
            let container_name = container["name"].as_str().unwrap();
            let args = docker_args(container);
            let run_name = format!("{name}-{container_name}");
            if container["restartPolicy"] == "Always" {
                // A native sidecar: started, then its startup probe must pass before the next.
                let (id, _) = self.run(&run_name, &args, false);
                pod.containers.insert(container_name.to_owned(), id);
                self.probe(&pod, container, "startupProbe");
            } else {
                assert!(container["restartPolicy"].is_null());
                let (id, output) = self.run(&run_name, &args, true);
                let output = output.unwrap();
                assert!(
                    output.status.success(),
                    "init container {container_name} failed: {}",
                    text(&output)
                );
                pod.containers.insert(container_name.to_owned(), id);
            }
        }
        for container in &main {
            let container_name = container["name"].as_str().unwrap();
            let args = docker_args(container);
            let (id, _) = self.run(&format!("{name}-{container_name}"), &args, false);
            pod.containers.insert(container_name.to_owned(), id);
        }
        for container in init.iter().chain(&main) {
            for probe in ["readinessProbe", "livenessProbe"] {
                self.probe(&pod, container, probe);
            }
        }
        pod
    }

    /// Sends `container`'s `kind` probe until it succeeds, for as long as the kubelet would:
    /// `initialDelaySeconds` plus `periodSeconds` × `failureThreshold`.
    fn probe(&self, pod: &Pod, container: &Value, kind: &str) {
        let probe = &container[kind];
        if probe.is_null() {
            return;
        }
        only_keys(
            probe,
            &[
                "httpGet",
                "periodSeconds",
                "failureThreshold",
                "initialDelaySeconds",
            ],
            kind,
        );
        let get = &probe["httpGet"];
        only_keys(get, &["path", "port"], kind);
        let path = get["path"].as_str().unwrap();
        let port = probe_port(container, &get["port"]);
        let period = probe["periodSeconds"].as_u64().unwrap_or(10);
        let threshold = probe["failureThreshold"].as_u64().unwrap_or(3);
        let delay = probe["initialDelaySeconds"].as_u64().unwrap_or(0);
        let budget = Duration::from_secs(delay + period * threshold);
        let started = Instant::now();
        loop {
            if let Some((status, _)) = http(&pod.ip, port, "GET", path)
                && (200..400).contains(&status)
            {
                return;
            }
            assert!(
                started.elapsed() < budget,
                "{} {}: {kind} GET :{port}{path} did not pass within {budget:?}\n{}",
                pod.name,
                container["name"],
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

#[test]
fn the_kubernetes_pods_run_under_docker_as_their_manifests_say() {
    if !support::docker_available("kubernetes_pod", false) {
        return;
    }
    let control_plane_docs = rendered("control-plane");
    let api_docs = rendered("api");
    let mut cluster = Cluster::new();

    // 1. The README's first step, the cluster's issuer and keys as a ConfigMap; then `kubectl
    //    apply -k examples/kubernetes/control-plane`: ready by its own probes.
    let issuer = BTreeMap::from([
        ("issuer".to_owned(), cluster.issuer.url.clone()),
        ("jwks.json".to_owned(), cluster.issuer.jwks()),
    ]);
    let control_plane = cluster.start_pod(
        &control_plane_docs,
        "sidewall-control-plane",
        &[CONTROL_PLANE_SERVICE],
        &BTreeMap::from([("sidewall-k8s-issuer", issuer)]),
    );
    // 2. The README's fingerprint step, through exec, with no --data-dir.
    let fingerprint = control_plane.exec("control-plane", &["sidewall", "ca", "fingerprint"]);
    assert!(fingerprint.status.success(), "{}", text(&fingerprint));
    let fingerprint = String::from_utf8_lossy(&fingerprint.stdout)
        .trim()
        .to_owned();
    assert_eq!(fingerprint.len(), 64, "{fingerprint}");
    let history = control_plane.exec("control-plane", &["sidewall", "policy", "history"]);
    assert!(
        text(&history).contains("gitops:/etc/sidewall/policies"),
        "the policy ConfigMap was not applied: {}",
        text(&history)
    );

    // 3. `kubectl apply -k examples/kubernetes/api`: its sidecar joins with the pod's
    //    service-account token.
    let api = cluster.start_pod(
        &api_docs,
        "api",
        &[],
        &BTreeMap::from([(
            "sidewall-ca",
            BTreeMap::from([("fingerprint".to_owned(), fingerprint)]),
        )]),
    );
    // The sidecar registered this pod's address, from POD_IP.
    let status = control_plane.exec("control-plane", &["sidewall", "status", "--json"]);
    assert!(status.status.success(), "{}", text(&status));
    assert!(
        text(&status).contains(&format!("{}:4643", api.ip)),
        "the api's sidecar did not register {}:4643: {}",
        api.ip,
        text(&status)
    );

    // A caller: the frontend's sidecar in a pod of its own on the same network, with an explicit
    // route to the api (the app's side of it is this test). It joins with a join token, the
    // other way in, made through exec.
    let created = control_plane.exec(
        "control-plane",
        &[
            "sidewall",
            "token",
            "create",
            "--identity",
            &format!("{TD}/frontend"),
        ],
    );
    assert!(created.status.success(), "token create: {}", text(&created));
    let frontend_token = BTreeMap::from([(
        "token".to_owned(),
        String::from_utf8_lossy(&created.stdout)
            .lines()
            .last()
            .unwrap()
            .to_owned(),
    )]);
    let (frontend_pause, frontend_ip) = cluster.pause("frontend-0", &[]);
    let frontend_dir = cluster.dirs.path().join("frontend");
    projected(
        &frontend_dir.join("config"),
        &BTreeMap::from([(
            "sidecar.yaml".to_owned(),
            format!(
                "identity: {TD}/frontend\n\
                 controlPlane:\n  urls: [https://{CONTROL_PLANE_SERVICE}:4600]\n  tokenFile: /var/run/secrets/sidewall/token\n\
                 stateDir: /var/lib/sidewall-proxy\n\
                 inbound:\n  listen: 0.0.0.0:4643\n  advertise: \"${{POD_IP}}:4643\"\n  ports: [{{port: 8080, app: 127.0.0.1:8080}}]\n\
                 outbound:\n  routes: [{{listen: 0.0.0.0:7001, service: {TD}/api, port: 8080}}]\n\
                 admin:\n  listen: 0.0.0.0:4691\n"
            ),
        )]),
        0o644,
        Some(65532),
    );
    projected(
        &frontend_dir.join("token"),
        &frontend_token,
        0o440,
        Some(65532),
    );
    pod_directory(&frontend_dir.join("state"), 0o2777, Some(65532));
    let volume = |from: &str, to: &str| format!("{}:{to}", frontend_dir.join(from).display());
    let args: Vec<String> = vec![
        "--network".into(),
        format!("container:{frontend_pause}"),
        "--user".into(),
        "65532:65532".into(),
        "--read-only".into(),
        "--cap-drop".into(),
        "ALL".into(),
        "--env".into(),
        format!("POD_IP={frontend_ip}"),
        "--volume".into(),
        volume("config", "/etc/sidewall/config:ro"),
        "--volume".into(),
        volume("token", "/var/run/secrets/sidewall:ro"),
        "--volume".into(),
        volume("state", "/var/lib/sidewall-proxy"),
        "--entrypoint".into(),
        "sidewall".into(),
        cluster.image.clone(),
        "proxy".into(),
        "--config".into(),
        "/etc/sidewall/config/sidecar.yaml".into(),
    ];
    cluster.run("frontend-0-sidewall", &args, false);
    let started = Instant::now();
    while http(&frontend_ip, 4691, "GET", "/ready").is_none_or(|(status, _)| status != 200) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the frontend's sidecar is not ready\n{}",
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(250));
    }

    // Allowed by policy: through, answered by the api app.
    let (status, body) = http(&frontend_ip, 7001, "GET", "/v1/orders").unwrap();
    assert_eq!(status, 200, "GET /v1/orders: {body}\n{}", cluster.logs());
    // Denied by policy: refused by the api's sidecar, never reaching the app.
    let (status, body) = http(&frontend_ip, 7001, "DELETE", "/v1/orders/42").unwrap();
    assert_eq!(status, 403, "DELETE /v1/orders/42: {body}");
    std::thread::sleep(Duration::from_millis(1500)); // the app rewrites its stats every second
    let stats: Value =
        serde_json::from_slice(&fs::read(api.volumes.join("app-tmp/stats.json")).unwrap()).unwrap();
    assert_eq!(
        stats["received"][format!("{TD}/frontend")],
        1,
        "the api app should have received the GET only: {stats}"
    );

    // Plaintext from the network reaches neither the app's port (redirected to the mTLS
    // listener) nor the mTLS listener itself; the probe port is the one way in, by design.
    for port in [8080, 4643] {
        assert_eq!(
            http(&api.ip, port, "GET", "/v1/orders"),
            None,
            "plaintext to the api pod's port {port} got an HTTP answer"
        );
    }
    let (status, _) = http(&api.ip, 8081, "GET", "/healthz").unwrap();
    assert_eq!(status, 200);
    eprintln!(
        "kubernetes pods: {} containers ran",
        cluster.containers.len()
    );
}
