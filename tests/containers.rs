//! Containers for real: every service in its own network namespace on one bridge, an
//! unmodified app in each, and the real `sidewall` binary as its sidecar in transparent mode
//! (`sidewall iptables install`). The control plane has its own namespace. Needs root (and
//! iproute2, iptables, python3, tshark: `scripts/test-deps`); without them it says SKIPPED.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // test helpers panic to report; blocking waits are fine here

#[path = "netns/mod.rs"]
mod netns;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use netns::{Host, SIDEWALL, Topology, User, count, python};

const TD: &str = "spiffe://sidewall.local/ns/shop/svc";

/// A long-lived client: sends one HTTP request, prints the reply's status line, then waits
/// until the connection is closed and prints "closed after N s".
const HOLD: &str = r#"
import socket, sys, time
conn = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60)
conn.sendall(b"GET /v1/orders HTTP/1.1\r\nHost: api\r\n\r\n")
reply = conn.recv(65536)
print(reply.split(b"\r\n")[0].decode(), flush=True)
start = time.time()
while True:
    try:
        if not conn.recv(65536):
            break
    except OSError:
        break
print(f"closed after {time.time() - start:.1f} s", flush=True)
"#;

/// A TCP echo server that prints one line per connection.
const COUNTING_ECHO: &str = r#"
import socket, sys, threading
server = socket.create_server(("127.0.0.1", int(sys.argv[1])))
def echo(conn):
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)
while True:
    conn, peer = server.accept()
    print("connection", flush=True)
    threading.Thread(target=echo, args=(conn,), daemon=True).start()
"#;

struct Mesh {
    net: Topology,
    cp: Host,
    frontend: Host,
    api: Host,
    db: Host,
    outsider: Host,
    data: PathBuf,
}

fn policy(frontend_allowed: bool) -> String {
    let from = if frontend_allowed {
        "frontend"
    } else {
        "nobody"
    };
    format!(
        "apiVersion: sidewall.dev/v1\nkind: Policy\nmetadata: {{name: api}}\nspec:\n  target: {TD}/api\n  onRevoke: terminate\n  rules:\n    - action: allow\n      from: [{TD}/{from}]\n      ports: [8080]\n      http: {{methods: [GET], paths: [\"/**\"]}}\n---\napiVersion: sidewall.dev/v1\nkind: Policy\nmetadata: {{name: db}}\nspec:\n  target: {TD}/db\n  rules:\n    - {{action: allow, from: [{TD}/api], ports: [5432]}}\n"
    )
}

impl Mesh {
    fn cli(&self, args: &[&str]) -> String {
        let mut argv = vec![SIDEWALL];
        argv.extend_from_slice(args);
        let data = self.data.display().to_string();
        argv.extend_from_slice(&["--data-dir", &data]);
        self.net
            .exec(&self.cp, User::Root, &argv)
            .ok(&format!("sidewall {args:?}"))
    }

    fn apply(&self, frontend_allowed: bool) {
        let dir = self.net.dir().join(format!("policies-{frontend_allowed}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("p.yaml"), policy(frontend_allowed)).unwrap();
        let out = self.cli(&[
            "policy",
            "apply",
            dir.to_str().unwrap(),
            "--wait",
            "--timeout",
            "30s",
        ]);
        assert!(out.contains("every affected sidecar applied"), "{out}");
    }

    /// A sidecar for `name` in `host`, in transparent mode, running as `uid`; iptables installed.
    /// `api`'s inbound listener is dual-stack (`[::]:4643`), the others' IPv4 only.
    fn sidecar(&mut self, host: &Host, name: &str, ports: &str, egress: &str, uid: u32) {
        let listen = if name == "api" {
            "\"[::]:4643\""
        } else {
            "0.0.0.0:4643"
        };
        let dir = self.net.dir().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let token = self.cli(&["token", "create", "--identity", &format!("{TD}/{name}")]);
        std::fs::write(dir.join("token"), token.lines().last().unwrap()).unwrap();
        let config = format!(
            "identity: {TD}/{name}\ncontrolPlane:\n  urls: [https://{}:4600]\n  tokenFile: token\nstateDir: state\ninbound:\n  listen: {listen}\n  advertise: {}:4643\n  ports: [{ports}]\noutbound:\n  transparent: {{listen: 127.0.0.1:4640}}\n  egress: [{egress}]\nadmin:\n  listen: 127.0.0.1:4691\nworkerThreads: 1\nlimits: {{handshakeTimeout: 3s}}\n",
            self.cp.ipv4, host.ipv4
        );
        std::fs::write(dir.join("sidecar.yaml"), config).unwrap();
        let chown = std::process::Command::new("chown")
            .args(["-R", &format!("{uid}:{uid}")])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(chown.success());
        self.net
            .exec(
                host,
                User::Root,
                &[
                    SIDEWALL,
                    "iptables",
                    "install",
                    "--proxy-uid",
                    &uid.to_string(),
                ],
            )
            .ok("sidewall iptables install");
        let mut command = self.net.command(host, User::Uid(uid), SIDEWALL);
        command
            .args(["proxy", "--config"])
            .arg(dir.join("sidecar.yaml"))
            .env("SIDEWALL_LOG", "info,sidewall_proxy=debug");
        self.net.spawn(&format!("{name}-sidecar"), command);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let run = self.net.exec(
                host,
                User::Root,
                &["curl", "-sf", "http://127.0.0.1:4691/ready"],
            );
            if run.code == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{name} sidecar not ready:\n{}",
                self.net.log(&format!("{name}-sidecar"))
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn curl(&self, from: &Host, user: User, url: &str) -> Result<String, String> {
        let run = self.net.exec(
            from,
            user,
            &[
                "curl",
                "-sS",
                "--max-time",
                "10",
                "-o",
                "-",
                "-w",
                " %{http_code}",
                url,
            ],
        );
        if run.code == 0 {
            Ok(run.stdout)
        } else {
            Err(format!("exit {}: {}", run.code, run.stderr.trim()))
        }
    }
}

fn mesh() -> Option<Mesh> {
    let mut net = netns::topology("containers", &["python3", "iptables", "curl"])?;
    let cp = net.add("cp");
    let frontend = net.add("frontend");
    let api = net.add("api");
    let db = net.add("db");
    let outsider = net.add("outsider");
    let data = net.dir().join("cp-data");
    let mut command = net.command(&cp, User::Root, SIDEWALL);
    command
        .args(["control-plane", "--data-dir"])
        .arg(&data)
        .args([
            "--listen",
            "0.0.0.0:4600",
            "--admin-listen",
            "127.0.0.1:4690",
            "--ui-listen",
            "127.0.0.1:4680",
        ]);
    net.spawn("control-plane", command);
    net.wait_listening(&cp, 4600);
    // The control plane records its address for the CLI right after binding.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !data.join("control-plane.json").exists() {
        assert!(
            Instant::now() < deadline,
            "the control plane did not record itself"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut mesh = Mesh {
        net,
        cp,
        frontend,
        api,
        db,
        outsider,
        data,
    };
    mesh.apply(true);

    // The apps know nothing of the mesh: a static HTTP server and a TCP echo on loopback.
    let site = mesh.net.dir().join("site");
    std::fs::create_dir_all(site.join("v1")).unwrap();
    std::fs::write(site.join("v1/orders"), "orders\n").unwrap();
    let (api, db) = (mesh.api.clone(), mesh.db.clone());
    let mut command = mesh.net.command(&api, User::Root, python());
    command
        .args([
            "-m",
            "http.server",
            "8080",
            "--bind",
            "127.0.0.1",
            "--directory",
        ])
        .arg(&site);
    mesh.net.spawn("api-app", command);
    let mut command = mesh.net.command(&db, User::Root, python());
    command.args(["-c", COUNTING_ECHO, "5432"]);
    mesh.net.spawn("db-app", command);
    mesh.net.wait_listening(&api, 8080);
    mesh.net.wait_listening(&db, 5432);

    let uid = netns::unused_uid();
    let frontend = mesh.frontend.clone();
    // An app port still open to plaintext during a migration (permissive), and a plaintext
    // destination outside the mesh the frontend may reach (egress).
    let mut command = mesh.net.command(&api, User::Root, python());
    command.args(["-c", COUNTING_ECHO, "9090"]);
    mesh.net.spawn("api-legacy", command);
    mesh.net.wait_listening(&api, 9090);
    let outsider = mesh.outsider.clone();
    mesh.net.echo_server(&outsider, 7);
    mesh.net.echo_server(&outsider, 8);
    let egress = format!("\"{}:7\"", outsider.ipv4);
    mesh.sidecar(
        &db,
        "db",
        "{port: 5432, protocol: tcp, app: 127.0.0.1:5432}",
        "",
        uid,
    );
    mesh.sidecar(
        &api,
        "api",
        "{port: 8080, protocol: http, app: 127.0.0.1:8080}, {port: 9090, protocol: tcp, app: 127.0.0.1:9090, permissive: true}, {port: 9091, protocol: http, app: 127.0.0.1:8080, permissive: true}",
        "",
        uid,
    );
    mesh.sidecar(&frontend, "frontend", "", &egress, uid);
    Some(mesh)
}

#[test]
fn containers() {
    let Some(mut mesh) = mesh() else { return };
    let (frontend, api, db, outsider) = (
        mesh.frontend.clone(),
        mesh.api.clone(),
        mesh.db.clone(),
        mesh.outsider.clone(),
    );
    let api_url = format!("http://{}:8080/v1/orders", api.ipv4);

    // 1. Allowed calls succeed with plain clients addressed to the other containers' IPs.
    assert_eq!(
        mesh.curl(&frontend, User::Root, &api_url),
        Ok("orders\n 200".to_owned()),
        "frontend -> api"
    );
    assert_eq!(
        mesh.net.call(&api, User::Root, db.ip(false), 5432, "ping"),
        Ok("ping".to_owned()),
        "api -> db"
    );

    // 2. A denied call fails, and the db app sees no connection at all.
    let before = mesh.net.log("db-app").lines().count();
    assert!(
        mesh.net
            .call(&frontend, User::Root, db.ip(false), 5432, "ping")
            .is_err(),
        "frontend -> db must fail"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        mesh.net.log("db-app").lines().count(),
        before,
        "the db app saw a connection from the frontend"
    );

    // 3. A namespace without a sidecar cannot reach any meshed app: plaintext is refused.
    assert!(
        mesh.curl(&outsider, User::Root, &api_url).is_err(),
        "outsider -> api must fail"
    );
    assert!(
        mesh.net
            .call(&outsider, User::Root, db.ip(false), 5432, "ping")
            .is_err(),
        "outsider -> db must fail"
    );

    // 4. No plaintext on the wire: a marker in the request never appears in a capture of the
    //    bridge, while the app receives it.
    if netns::installed("tshark") || netns::installed("tcpdump") {
        let marker = "sidewall-marker-7c41e0";
        let capture = mesh.net.capture();
        let _ = mesh.curl(
            &frontend,
            User::Root,
            &format!("http://{}:8080/{marker}", api.ipv4),
        );
        let bytes = capture.stop();
        assert!(
            bytes.len() > 1000,
            "the capture saw the transfer ({} bytes)",
            bytes.len()
        );
        assert_eq!(
            count(&bytes, marker.as_bytes()),
            0,
            "the marker crossed the bridge in plaintext"
        );
        assert!(
            mesh.net.log("api-app").contains(marker),
            "the app received the request"
        );
    } else {
        netns::skip(
            "containers: the capture",
            "neither tshark nor tcpdump is installed",
        );
    }

    // 5. A policy change cuts an open frontend -> api connection (onRevoke: terminate).
    let mut command = mesh.net.command(&frontend, User::Root, python());
    command.args(["-c", HOLD, &api.ipv4.to_string(), "8080"]);
    mesh.net.spawn("hold", command);
    wait_for(&mesh.net, "hold", "HTTP/1.", 10);
    let started = Instant::now();
    mesh.apply(false);
    wait_for(&mesh.net, "hold", "closed after", 15);
    eprintln!("policy apply to connection closed: {:?}", started.elapsed());
    assert!(
        mesh.curl(&frontend, User::Root, &api_url).is_err_or_403(),
        "new connections are denied"
    );
    mesh.apply(true);
    assert_eq!(
        mesh.curl(&frontend, User::Root, &api_url),
        Ok("orders\n 200".to_owned())
    );

    // 6. The control plane's namespace goes down: new allowed connections still work.
    mesh.net.link_down(&mesh.cp.clone());
    for _ in 0..3 {
        assert_eq!(
            mesh.curl(&frontend, User::Root, &api_url),
            Ok("orders\n 200".to_owned()),
            "while the control plane is down"
        );
    }
    mesh.net.link_up(&mesh.cp.clone());

    // 7. An app running as root has no way around its sidecar: a denied destination stays
    //    denied when it connects directly by IP, over IPv4 and IPv6, and the sidecar's own
    //    listener does not take plaintext either.
    let before = mesh.net.log("db-app").lines().count();
    for v6 in [false, true] {
        let result = mesh
            .net
            .call(&frontend, User::ContainerRoot, db.ip(v6), 5432, "ping");
        assert!(
            result.is_err(),
            "root app -> db over {}: {result:?}",
            if v6 { "IPv6" } else { "IPv4" }
        );
    }
    assert!(
        mesh.net
            .call(&frontend, User::ContainerRoot, db.ip(false), 4643, "ping")
            .is_err()
    );
    let flush = mesh.net.exec(
        &frontend,
        User::ContainerRoot,
        &["iptables", "-t", "nat", "-F"],
    );
    assert_ne!(flush.code, 0, "the app cannot remove the rules");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(mesh.net.log("db-app").lines().count(), before);

    // 8. Outside the mesh, only what `outbound.egress` names is reachable, in plaintext.
    assert_eq!(
        mesh.net
            .call(&frontend, User::Root, outsider.ip(false), 7, "out"),
        Ok("out".to_owned()),
        "egress allowed"
    );
    // The sidecar closes the refused connection: a reset or an empty reply, depending on
    // whether the client's bytes had arrived; never the echo.
    let unlisted = mesh
        .net
        .call(&frontend, User::Root, outsider.ip(false), 8, "out");
    assert!(
        !matches!(&unlisted, Ok(reply) if reply == "out"),
        "egress not listed: {unlisted:?}"
    );

    // 9. A permissive port takes plaintext from a workload without a sidecar; the others do not.
    // Review L8: api's listener is dual-stack, where an IPv4 connection is v4-mapped; its
    // original destination was read with the IPv6 option, failed, and the permissive port
    // refused plaintext (and the port-header check was skipped).
    assert_eq!(
        mesh.net
            .call(&outsider, User::Root, api.ip(false), 9090, "legacy"),
        Ok("legacy".to_owned()),
        "permissive port"
    );
    assert!(
        mesh.curl(&outsider, User::Root, &api_url).is_err(),
        "the HTTP port stays mTLS-only"
    );

    // 10. Review H1: on a permissive HTTP port, a client that sent one byte (or only the HTTP/2
    // preface) and nothing more held its connection, and a slot of the authenticated budget,
    // forever: the HTTP version sniff had no deadline. Now the first request must arrive
    // within limits.handshakeTimeout (3 s here), and the connection stays in the handshake
    // budget until it does.
    let legacy_http = format!("http://{}:9091/v1/orders", api.ipv4);
    assert_eq!(
        mesh.curl(&outsider, User::Root, &legacy_http),
        Ok("orders\n 200".to_owned()),
        "permissive HTTP port"
    );
    for stall in ["one-byte", "h2-preface"] {
        let run = mesh.net.exec(
            &outsider,
            User::Root,
            &[python(), "-c", STALL, &api.ipv4.to_string(), "9091", stall],
        );
        assert_eq!(run.code, 0, "{stall}: {}{}", run.stdout, run.stderr);
    }
    let _ = &mut mesh;
}

/// Connects, sends one byte (`one-byte`) or the HTTP/2 preface and an empty SETTINGS frame
/// (`h2-preface`), then waits up to 20 s for the server to close; exit 1 if it did not.
const STALL: &str = r#"
import socket, sys, time
conn = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
if sys.argv[3] == "one-byte":
    conn.sendall(b"P")
else:
    conn.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))
conn.settimeout(20)
start = time.monotonic()
try:
    while conn.recv(65536):
        pass
except ConnectionResetError:
    pass
except socket.timeout:
    print("still open after 20 s")
    sys.exit(1)
print(f"closed after {time.monotonic() - start:.1f} s")
"#;

fn wait_for(net: &Topology, label: &str, text: &str, seconds: u64) {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while !net.log(label).contains(text) {
        assert!(
            Instant::now() < deadline,
            "{label} never printed {text:?}:\n{}",
            net.log(label)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

trait DeniedOrRefused {
    fn is_err_or_403(&self) -> bool;
}

impl DeniedOrRefused for Result<String, String> {
    fn is_err_or_403(&self) -> bool {
        match self {
            Ok(body) => body.ends_with(" 403"),
            Err(_) => true,
        }
    }
}
