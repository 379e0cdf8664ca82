//! HTTP ports: the bypass matrix (each crafted request gets the outcome it must get, and the
//! app never sees a refused one), keep-alive with mixed outcomes, HTTP/2 with 100 concurrent
//! streams and rapid resets, a 1 GiB streamed body, and a WebSocket upgrade.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // test helpers panic to report; blocking waits are fine here

mod support;

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::{ControlPlaneProcess, ProxyProcess, free_port};

const TD: &str = "spiffe://sidewall.local/ns/demo/svc";

/// What the app received: "METHOD path?query peer-header".
type Seen = Arc<Mutex<Vec<String>>>;

/// An HTTP app (hyper) that records each request and answers 200 with what it saw; it echoes
/// after a WebSocket upgrade, counts the bytes of a POST body to /v1/orders/upload, and answers
/// /static/big with [`big_body`].
/// 64 MiB, one allocation shared by every response: more than the socket buffers of both
/// loopback hops hold, so a client that stops reading stalls the response's HTTP/2 stream.
fn big_body() -> Bytes {
    static BIG: std::sync::OnceLock<Bytes> = std::sync::OnceLock::new();
    BIG.get_or_init(|| Bytes::from(vec![b'x'; 64 << 20]))
        .clone()
}

fn start_app(runtime: &tokio::runtime::Runtime) -> (u16, Seen) {
    let seen: Seen = Arc::default();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let record = seen.clone();
    runtime.spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let record = record.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |mut request: Request<hyper::body::Incoming>| {
                        let record = record.clone();
                        async move {
                            // Every spelling CGI/WSGI/Rack/PHP fold into one variable
                            // (HTTP_X_SIDEWALL_PEER_IDENTITY): `_` and `-` alike.
                            let peer = request
                                .headers()
                                .iter()
                                .filter(|(name, _)| {
                                    name.as_str().replace('_', "-") == "x-sidewall-peer-identity"
                                })
                                .map(|(_, v)| v.to_str().unwrap_or("?").to_owned())
                                .collect::<Vec<_>>()
                                .join(",");
                            let line = format!("{} {} {peer}", request.method(), request.uri());
                            record.lock().unwrap().push(line.clone());
                            if request.headers().contains_key(hyper::header::UPGRADE) {
                                let upgrade = hyper::upgrade::on(&mut request);
                                tokio::spawn(async move {
                                    let mut io = TokioIo::new(upgrade.await.unwrap());
                                    let mut buf = [0u8; 64];
                                    let n = tokio::io::AsyncReadExt::read(&mut io, &mut buf)
                                        .await
                                        .unwrap();
                                    tokio::io::AsyncWriteExt::write_all(&mut io, &buf[..n])
                                        .await
                                        .unwrap();
                                });
                                let mut response = Response::new(Full::new(Bytes::new()));
                                *response.status_mut() = hyper::StatusCode::SWITCHING_PROTOCOLS;
                                response
                                    .headers_mut()
                                    .insert(hyper::header::UPGRADE, "websocket".parse().unwrap());
                                response
                                    .headers_mut()
                                    .insert(hyper::header::CONNECTION, "Upgrade".parse().unwrap());
                                return Ok::<_, hyper::Error>(response);
                            }
                            if request.uri().path() == "/static/big" {
                                return Ok(Response::new(Full::new(big_body())));
                            }
                            let mut total = 0usize;
                            let mut body = request.into_body();
                            while let Some(frame) = body.frame().await {
                                total += frame?.data_ref().map_or(0, |d| d.len());
                            }
                            Ok(Response::new(Full::new(Bytes::from(format!(
                                "{line} body={total}"
                            )))))
                        }
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (port, seen)
}

const POLICY: &str = r#"apiVersion: sidewall.dev/v1
kind: Policy
metadata: {name: api-http}
spec:
  target: spiffe://sidewall.local/ns/demo/svc/api
  rules:
    - action: allow
      from: [spiffe://sidewall.local/ns/demo/svc/web]
      ports: [8080]
      http:
        methods: [GET, POST]
        paths: [/v1/orders, "/v1/orders/*", "/static/**"]
        hosts: [api.shop]
    - action: deny
      from: [spiffe://sidewall.local/ns/demo/svc/web]
      http: {paths: ["/admin/**"]}
"#;

struct Mesh {
    _dir: tempfile::TempDir,
    _cp: ControlPlaneProcess,
    api: ProxyProcess,
    api_inbound: u16,
    web: ProxyProcess,
    route: u16,
    seen: Seen,
    runtime: tokio::runtime::Runtime,
}

fn mesh() -> Mesh {
    mesh_with("", "")
}

fn mesh_with(extra: &str, listed: &str) -> Mesh {
    mesh_limited(extra, listed, "")
}

/// A mesh whose api port has `extra` in its inbound entry (e.g. `, appProtocol: http2`), and
/// `listed` in web's (local) directory entry for it; `limits` is each sidecar's `limits:` map
/// (empty: the defaults).
fn mesh_limited(extra: &str, listed: &str, limits: &str) -> Mesh {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (app, seen) = start_app(&runtime);
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    std::fs::write(dir.path().join("policies/api.yaml"), POLICY).unwrap();
    let cp = ControlPlaneProcess::start(&dir.path().join("cp"), &[]);
    let api_inbound = free_port();
    let route = free_port();
    let sidecar = |name: &str, ports: String, routes: String| {
        let run = cp.cli(&["token", "create", "--identity", &format!("{TD}/{name}")]);
        std::fs::write(
            dir.path().join(format!("{name}.token")),
            run.stdout.lines().last().unwrap(),
        )
        .unwrap();
        let admin = free_port();
        let inbound = if name == "api" {
            api_inbound
        } else {
            free_port()
        };
        let config = format!(
            "identity: {TD}/{name}\ncontrolPlane:\n  urls: [https://127.0.0.1:{}]\n  tokenFile: {name}.token\nstateDir: state/{name}\ninbound:\n  listen: 127.0.0.1:{inbound}\n  ports: [{ports}]\noutbound:\n  routes: [{routes}]\nadmin:\n  listen: 127.0.0.1:{admin}\nlocal:\n  policies: [policies]\n  directory:\n    - {{identity: {TD}/api, endpoints: [127.0.0.1:{api_inbound}], ports: [{{port: 8080, protocol: http{listed}}}]}}\nworkerThreads: 1\nlimits: {{{limits}}}\n",
            cp.api_port
        );
        let proxy = ProxyProcess::start(dir.path(), name, &config, admin);
        proxy.wait_ready();
        proxy
    };
    let api = sidecar(
        "api",
        format!("{{port: 8080, protocol: http, app: 127.0.0.1:{app}{extra}}}"),
        String::new(),
    );
    let web = sidecar(
        "web",
        String::new(),
        format!("{{listen: 127.0.0.1:{route}, service: {TD}/api, port: 8080}}"),
    );
    Mesh {
        _dir: dir,
        _cp: cp,
        api,
        api_inbound,
        web,
        route,
        seen,
        runtime,
    }
}

/// Sends raw bytes on a new connection through the web sidecar; returns the response text.
fn raw(port: u16, request: &[u8]) -> String {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(request).unwrap();
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

fn status(response: &str) -> u16 {
    response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[test]
fn bypass_matrix() {
    let mesh = mesh();
    let web = format!("{TD}/web");
    let get = |target: &str, host: &str| {
        format!("GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
    };
    let allowed: Vec<(String, &str)> = vec![
        (get("/v1/orders", "api.shop"), "GET /v1/orders"),
        (get("/v1/orders?x=1", "api.shop"), "GET /v1/orders?x=1"),
        (get("/v1//orders", "api.shop"), "GET /v1/orders "),
        (get("/v1/./orders", "api.shop"), "GET /v1/orders "),
        (get("/%761/orders", "api.shop"), "GET /v1/orders "),
        (get("/v1/orders/7", "API.SHOP."), "GET /v1/orders/7 "),
        (get("/static/app.js", "api.shop:80"), "GET /static/app.js "),
        (
            "GET /v1/orders HTTP/1.1\r\nHost: api.shop\r\nx-sidewall-peer-identity: spiffe://sidewall.local/ns/demo/svc/admin\r\nConnection: close\r\n\r\n".to_owned(),
            "GET /v1/orders ",
        ),
        // Review M7: the underscore spelling names the same CGI variable.
        (
            "GET /v1/orders HTTP/1.1\r\nHost: api.shop\r\nx_sidewall_peer_identity: spiffe://sidewall.local/ns/demo/svc/admin\r\nX_Sidewall-Peer_Identity: spiffe://sidewall.local/ns/demo/svc/admin\r\nConnection: close\r\n\r\n".to_owned(),
            "GET /v1/orders ",
        ),
    ];
    for (request, expected) in &allowed {
        let response = raw(mesh.route, request.as_bytes());
        assert_eq!(status(&response), 200, "{request:?}\n{response}");
        assert!(response.contains(expected), "{request:?}\n{response}");
        assert!(
            response.contains(&format!(" {web} body=")),
            "the app sees exactly the authenticated peer: {response}"
        );
    }
    let big_header = format!(
        "GET /v1/orders HTTP/1.1\r\nHost: api.shop\r\nX-Big: {}\r\n\r\n",
        "a".repeat(40 * 1024)
    );
    let refused: Vec<(String, u16)> = vec![
        (get("/admin", "api.shop"), 403),
        (get("/a/../admin/x", "api.shop"), 403),
        (get("/./admin/x", "api.shop"), 403),
        (get("//admin/x", "api.shop"), 403),
        (get("/%2Fadmin", "api.shop"), 400),
        (get("/%2e%2e/admin", "api.shop"), 400),
        (get("/admin%00", "api.shop"), 400),
        (get("\\admin", "api.shop"), 400),
        (get("/ADMIN", "api.shop"), 403),
        (get("/V1/orders", "api.shop"), 403),
        (get("/admin#x", "api.shop"), 403),
        (get("/admin?x", "api.shop"), 403),
        (get("/v1/orders/../../admin/x", "api.shop"), 403),
        (get("/static/../admin/x", "api.shop"), 403),
        // Review H7: Java servers strip `;` path parameters before they resolve dot segments.
        (get("/static/..;/admin/x", "api.shop"), 400),
        (get("/static/app.js;x=1", "api.shop"), 400),
        (get("/admin;x/users", "api.shop"), 400),
        (get("/v1/orders%2F..%2Fadmin", "api.shop"), 400),
        (get("/v1/orders/%2e%2e/admin", "api.shop"), 400),
        (get("/v1/orders/..%2fadmin", "api.shop"), 400),
        (get("/v1/orders%5cadmin", "api.shop"), 400),
        (get("/%61dmin/x", "api.shop"), 403),
        (get("/v1/orders/1/2", "api.shop"), 403),
        (get("/static", "api.shop"), 403),
        (get("/v1/orders%0d%0aX:%20y", "api.shop"), 400),
        (get("/v1/orders", "evil.com"), 403),
        (get("/v1/orders", "api.shop.evil.com"), 403),
        (get("/v1/orders", "user@api.shop"), 400),
        // Review M12: a port that is not 1-65535 would miss every host rule while apps strip it.
        (get("/v1/orders", "api.shop:abc"), 400),
        (get("/v1/orders", "api.shop:0"), 400),
        (get("/v1/orders", "api.shop:99999"), 400),
        (get("/v1/orders", "api.shop:"), 400),
        // Review L5: `?` and `#` in Host would rewrite the HTTP/2 URI the app receives.
        (get("/v1/orders", "api.shop#"), 400),
        (get("/v1/orders", "api.shop?"), 400),
        (get("/v1/orders", "api.shop%2e"), 400),
        (get("/v1/orders", "api.shop/../admin"), 400),
        ("GET /v1/orders HTTP/1.1\r\nConnection: close\r\n\r\n".into(), 400),
        ("GET /v1/orders HTTP/1.0\r\n\r\n".into(), 403),
        ("GET /v1/orders HTTP/1.1\r\nHost: api.shop\r\nHost: evil.com\r\n\r\n".into(), 400),
        ("POST /v1/orders HTTP/1.1\r\nHost: api.shop\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd".into(), 400),
        ("POST /v1/orders HTTP/1.1\r\nHost: api.shop\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".into(), 400),
        ("POST /v1/orders HTTP/1.1\r\nHost: api.shop\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n0\r\n\r\n".into(), 400),
        ("POST /v1/orders HTTP/1.1\r\nHost: api.shop\r\nTransfer-Encoding: gzip\r\n\r\n".into(), 400),
        ("GET /v1/orders HTTP/1.1\r\nHost: api.shop\r\nX-A: a\r\n b\r\n\r\n".into(), 400),
        ("GET /v1/orders HTTP/1.1\r\nHost: api.shop\r\nX-A: a\0b\r\n\r\n".into(), 400),
        ("GET /v1/orders HTTP/1.1\r\nHost: api.shop\r\nX-A: a\rb\r\n\r\n".into(), 400),
        (big_header, 431),
        ("DELETE /v1/orders HTTP/1.1\r\nHost: api.shop\r\n\r\n".into(), 403),
        ("PUT /v1/orders HTTP/1.1\r\nHost: api.shop\r\nContent-Length: 0\r\n\r\n".into(), 403),
        ("get /v1/orders HTTP/1.1\r\nHost: api.shop\r\n\r\n".into(), 403),
        ("CONNECT api.shop:443 HTTP/1.1\r\nHost: api.shop:443\r\n\r\n".into(), 405),
        ("GET /v1/orders HTTP/1.1\r\nHost: api.shop\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n".into(), 400),
        ("GET /v1/orders HTTP/1.1\r\nHost: api.shop\r\nConnection: Upgrade\r\nUpgrade: foo\r\n\r\n".into(), 400),
        ("GET http://api.shop/admin/x HTTP/1.1\r\nHost: api.shop\r\n\r\n".into(), 400),
        ("GET /admin/x HTTP/1.1\r\nHost: api.shop\r\n\r\n".into(), 403),
    ];
    assert!(refused.len() >= 40, "{} cases", refused.len());
    let before = mesh.seen.lock().unwrap().len();
    for (request, expected) in &refused {
        let response = raw(mesh.route, request.as_bytes());
        // hyper answers 431 before reading the whole oversize head and then closes with bytes
        // unread, so the kernel may send a reset that overtakes the 431 on its way back through
        // the client sidecar: a closed connection is the same refusal.
        if *expected == 431 && status(&response) == 0 {
            continue;
        }
        assert_eq!(status(&response), *expected, "{request:?}\n{response}");
        if *expected == 403 {
            assert!(
                response.ends_with("forbidden\n"),
                "short body naming no internals: {response}"
            );
        }
    }
    let seen = mesh.seen.lock().unwrap().clone();
    assert_eq!(
        seen.len(),
        before,
        "the app saw a refused request: {:?}",
        &seen[before..]
    );

    // Content-Length with Transfer-Encoding, behind clean requests on one keep-alive
    // connection: the clean ones pass, the ambiguous one is refused and ends the connection,
    // and what follows it never reaches the app.
    let clean = get("/v1/orders/1", "api.shop").replace("Connection: close\r\n", "");
    let smuggle = format!(
        "{clean}POST /v1/orders/chunked HTTP/1.1\r\nHost: api.shop\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n{clean}POST /v1/orders HTTP/1.1\r\nHost: api.shop\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /v1/orders/smuggled HTTP/1.1\r\nHost: api.shop\r\n\r\n"
    );
    let before = mesh.seen.lock().unwrap().len();
    let response = raw(mesh.route, smuggle.as_bytes());
    let statuses: Vec<&str> = response
        .match_indices("HTTP/1.1 ")
        .map(|(i, _)| &response[i + 9..i + 12])
        .collect();
    assert_eq!(statuses, ["200", "200", "200", "400"], "{response}");
    assert!(response.contains("connection: close"), "{response}");
    let seen = mesh.seen.lock().unwrap().clone();
    assert_eq!(
        seen[before..],
        [
            format!("GET /v1/orders/1 {web}"),
            format!("POST /v1/orders/chunked {web}"),
            format!("GET /v1/orders/1 {web}"),
        ],
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .all(|s| !s.to_ascii_lowercase().contains("admin")),
        "{seen:?}"
    );

    // Every request above left the web sidecar on one pooled HTTP/2 connection.
    let metrics = mesh.web.metrics();
    let opened = support::metric(
        &metrics,
        "sidewall_proxy_h2_pool_total",
        &[("event", "opened")],
    );
    let reused = support::metric(
        &metrics,
        "sidewall_proxy_h2_pool_total",
        &[("event", "reused")],
    );
    assert_eq!(opened, 1, "{metrics}");
    assert!(reused >= 20, "{metrics}");
}

/// Review H7, the option: an app that uses `;` path parameters (Java session ids) gets a port
/// that strips them before the path is matched and forwarded (`pathParameters: strip`); a dot
/// segment with parameters stays refused, and what the app receives is what was matched.
#[test]
fn h7_path_parameters_are_stripped_where_the_port_says_so() {
    let mesh = mesh_with(", pathParameters: strip", ", pathParameters: strip");
    let get = |target: &str| {
        let request =
            format!("GET {target} HTTP/1.1\r\nHost: api.shop\r\nConnection: close\r\n\r\n");
        raw(mesh.route, request.as_bytes())
    };
    for (target, seen) in [
        ("/v1/orders;jsessionid=1", "GET /v1/orders "),
        ("/v1;x/orders/7;y=2", "GET /v1/orders/7 "),
        ("/static;v=2/app.js?x=1", "GET /static/app.js?x=1 "),
    ] {
        let response = get(target);
        assert_eq!(status(&response), 200, "{target}\n{response}");
        assert!(response.contains(seen), "{target}\n{response}");
    }
    for (target, expected) in [
        ("/static/..;/admin/x", 400),
        ("/v1/orders/.;x/7", 400),
        ("/admin;x/users", 403),
    ] {
        assert_eq!(status(&get(target)), expected, "{target}");
    }
    assert_eq!(mesh.seen.lock().unwrap().len(), 3, "{:?}", mesh.seen);
}

#[test]
fn http2_to_the_app_with_the_host_as_authority() {
    let mesh = mesh_with(", appProtocol: http2", "");
    for path in ["/v1/orders", "/v1/orders/2?x=1", "/v1//orders/./3"] {
        let response = raw(
            mesh.route,
            format!("GET {path} HTTP/1.1\r\nHost: api.shop\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        );
        assert_eq!(status(&response), 200, "{response}");
        // An HTTP/2 request carries the absolute target: the normalized path under the host.
        let normalized = path.replace("//", "/").replace("/./", "/");
        assert!(
            response.contains(&format!("GET http://api.shop{normalized} ")),
            "{response}"
        );
    }
    let response = raw(
        mesh.route,
        b"GET /admin/x HTTP/1.1\r\nHost: api.shop\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status(&response), 403, "{response}");
    assert_eq!(mesh.seen.lock().unwrap().len(), 3);
}

#[test]
fn keep_alive_with_mixed_outcomes_on_one_connection() {
    let mesh = mesh();
    let request = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: api.shop\r\n\r\n");
    let pipelined = format!(
        "{}{}{}",
        request("/v1/orders"),
        request("/admin/x"),
        request("/v1/orders/9")
    );
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", mesh.route)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(pipelined.as_bytes()).unwrap();
    let mut text = String::new();
    let mut buf = [0u8; 4096];
    while text.matches("HTTP/1.1 ").count() < 3 {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "closed early: {text}");
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let statuses: Vec<&str> = text
        .match_indices("HTTP/1.1 ")
        .map(|(i, _)| &text[i + 9..i + 12])
        .collect();
    assert_eq!(statuses, ["200", "403", "200"], "{text}");
    // Request latencies are a histogram with buckets (a fleet-wide p99 can be computed).
    let metrics = mesh.api.metrics();
    assert!(
        metrics.contains("sidewall_proxy_http_request_seconds_bucket{"),
        "{metrics}"
    );
    assert!(metrics.contains("component=\"proxy\""), "{metrics}");
}

/// A keep-alive connection from the app reads its next request whenever the app sends it:
/// apps pool connections for a minute or more, and a request sent on a connection the sidecar
/// closed while idle fails (a POST cannot be retried). The 10 s head deadline counts from a
/// head's first byte, so a slow head is still cut off.
#[test]
fn idle_keep_alive_outlives_the_head_deadline_but_a_slow_head_does_not() {
    let mesh = mesh();
    let request = b"GET /v1/orders HTTP/1.1\r\nHost: api.shop\r\n\r\n";
    let read_response = |stream: &mut std::net::TcpStream| {
        let mut text = String::new();
        let mut buf = [0u8; 4096];
        while !text.contains("\r\n\r\n") {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => text.push_str(&String::from_utf8_lossy(&buf[..n])),
            }
        }
        text
    };
    let mut pooled = std::net::TcpStream::connect(("127.0.0.1", mesh.route)).unwrap();
    pooled
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    pooled.write_all(request).unwrap();
    assert_eq!(status(&read_response(&mut pooled)), 200);
    let mut slow = std::net::TcpStream::connect(("127.0.0.1", mesh.route)).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // A defect: the sidecar armed the head deadline only when it started waiting, so a head
    // whose first byte came after that (here a second after the connection) was timed by the
    // idle timeout (an hour) instead. Failed before the fix: still open after 41 s.
    std::thread::sleep(Duration::from_secs(1));
    slow.write_all(b"GET /v1/orders HTTP/1.1\r\nHost: api")
        .unwrap();
    std::thread::sleep(Duration::from_millis(11_500));
    pooled.write_all(request).unwrap();
    let again = read_response(&mut pooled);
    assert_eq!(
        status(&again),
        200,
        "the idle keep-alive connection was closed: {again:?}"
    );
    // Closed at 10 s; the longer wait only leaves room for a loaded machine's late timers.
    slow.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut rest = Vec::new();
    let read = slow.read_to_end(&mut rest);
    assert!(
        read.is_ok() && rest.is_empty(),
        "a head unfinished for 11.5 s is still open: {read:?} {rest:?}"
    );
    let metrics = mesh.web.metrics();
    assert_eq!(
        support::metric(
            &metrics,
            "sidewall_proxy_connections_closed_total",
            &[("reason", "header_timeout")]
        ),
        1,
        "{metrics}"
    );
}

/// `limits.idleTimeout` closes an app's HTTP connection that carried nothing either way for
/// that long, as it does a TCP connection.
#[test]
fn an_idle_http_connection_closes_at_the_idle_timeout() {
    let mesh = mesh_limited("", "", "idleTimeout: 2s");
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", mesh.route)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .write_all(b"GET /v1/orders HTTP/1.1\r\nHost: api.shop\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = stream.read(&mut buf).unwrap();
    assert_eq!(status(&String::from_utf8_lossy(&buf[..n])), 200);
    let quiet = std::time::Instant::now();
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "{rest:?}");
    assert!(
        quiet.elapsed() >= Duration::from_millis(1500),
        "closed after {:?}, before the idle timeout",
        quiet.elapsed()
    );
    let metrics = mesh.web.metrics();
    assert_eq!(
        support::metric(
            &metrics,
            "sidewall_proxy_connections_closed_total",
            &[("reason", "idle")]
        ),
        1,
        "{metrics}"
    );
}

#[test]
fn http2_streams_resets_large_bodies_and_websockets() {
    let mesh = mesh();
    let route = mesh.route;
    mesh.runtime.block_on(async move {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", route))
            .await
            .unwrap();
        let (sender, connection) = hyper::client::conn::http2::handshake::<_, _, Full<Bytes>>(
            TokioExecutor::new(),
            TokioIo::new(tcp),
        )
        .await
        .unwrap();
        tokio::spawn(connection);
        let request = |path: &str| {
            Request::get(format!("http://api.shop{path}"))
                .body(Full::new(Bytes::new()))
                .unwrap()
        };
        // 100 concurrent streams on one connection, allowed and denied mixed.
        let mut tasks = Vec::new();
        for i in 0..100 {
            let mut sender = sender.clone();
            let path = if i % 10 == 0 {
                "/admin/x".to_owned()
            } else {
                format!("/v1/orders/{i}")
            };
            tasks.push(tokio::spawn(async move {
                sender
                    .send_request(request(&path))
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            }));
        }
        let mut statuses = Vec::new();
        for task in tasks {
            statuses.push(task.await.unwrap());
        }
        assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 90);
        assert_eq!(statuses.iter().filter(|s| **s == 403).count(), 10);
        // :authority and Host disagreeing.
        let mut mismatch = request("/v1/orders");
        mismatch
            .headers_mut()
            .insert(hyper::header::HOST, "evil.com".parse().unwrap());
        assert_eq!(
            sender
                .clone()
                .send_request(mismatch)
                .await
                .unwrap()
                .status(),
            400
        );
        // Rapid reset: many streams opened and cancelled at once.
        for _ in 0..300 {
            let mut sender = sender.clone();
            let future =
                tokio::spawn(async move { sender.send_request(request("/v1/orders")).await });
            future.abort();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        // The sidecar survives and serves new connections.
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", route))
            .await
            .unwrap();
        let (mut fresh, connection) = hyper::client::conn::http2::handshake::<_, _, Full<Bytes>>(
            TokioExecutor::new(),
            TokioIo::new(tcp),
        )
        .await
        .unwrap();
        tokio::spawn(connection);
        assert_eq!(
            fresh
                .send_request(request("/v1/orders"))
                .await
                .unwrap()
                .status(),
            200
        );
    });

    // A 1 GiB body streamed through both sidecars (HTTP/1.1, chunked).
    let answer = mesh.runtime.block_on(async move {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", route))
            .await
            .unwrap();
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(connection);
        let chunk = Bytes::from(vec![7u8; 1024 * 1024]);
        let stream = futures_stream(chunk, 1024);
        let request = Request::post("/v1/orders/upload")
            .header("host", "api.shop")
            .body(stream)
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        String::from_utf8(
            response
                .into_body()
                .collect()
                .await
                .unwrap()
                .to_bytes()
                .to_vec(),
        )
        .unwrap()
    });
    assert!(
        answer.ends_with(&format!("body={}", 1024 * 1024 * 1024)),
        "{answer}"
    );

    // A WebSocket upgrade switches to raw forwarding after the app's 101.
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", mesh.route)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(b"GET /v1/orders HTTP/1.1\r\nHost: api.shop\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    stream.write_all(b"raw frames").unwrap();
    let mut echoed = [0u8; 10];
    stream.read_exact(&mut echoed).unwrap();
    assert_eq!(&echoed, b"raw frames");
}

/// A body of `count` copies of `chunk`, produced as it is sent.
fn futures_stream(chunk: Bytes, count: usize) -> http_body_util::StreamBody<ChunkStream> {
    http_body_util::StreamBody::new(ChunkStream { chunk, left: count })
}

struct ChunkStream {
    chunk: Bytes,
    left: usize,
}

impl futures_core::Stream for ChunkStream {
    type Item = Result<hyper::body::Frame<Bytes>, std::convert::Infallible>;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        if self.left == 0 {
            return std::task::Poll::Ready(None);
        }
        self.left -= 1;
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(self.chunk.clone()))))
    }
}

/// Review M9 found that stalled streams froze the shared TCP connections between sidecars; this
/// checks the same on HTTP ports: ten 64 MiB responses whose client stopped reading do not
/// freeze another request to the service on the shared HTTP/2 connection. (It held before the
/// fix of the TCP connections too: a guard, not a reproduction.)
#[test]
fn m9_stalled_responses_do_not_freeze_other_requests() {
    let mesh = mesh();
    let mut stalled = Vec::new();
    for _ in 0..10 {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", mesh.route)).unwrap();
        stream
            .write_all(b"GET /static/big HTTP/1.1\r\nHost: api.shop\r\n\r\n")
            .unwrap();
        stalled.push(stream);
    }
    std::thread::sleep(Duration::from_secs(3));
    let response = raw(
        mesh.route,
        b"GET /v1/orders HTTP/1.1\r\nHost: api.shop\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(
        status(&response),
        200,
        "a request froze behind the stalled responses: {response:?}"
    );
    drop(stalled);
}

/// Hostile suite `h2-ping-flood`: an allowed peer streaming `PING`s (or `SETTINGS`) on an
/// HTTP/2 connection to an HTTP port kept a worker answering them, with no limit. Now a
/// connection that sends more than a burst of 100 control frames (refilled at 10 a second) is
/// closed and counted, and requests keep working.
#[test]
fn control_frame_floods_close_the_http2_connection() {
    let mesh = mesh();
    assert_eq!(
        status(&raw(
            mesh.route,
            b"GET /v1/orders HTTP/1.1\r\nHost: api.shop\r\n\r\n"
        )),
        200
    );
    let peer_state = mesh._dir.path().join("state/web");
    let target = support::FloodTarget {
        port: mesh.api_inbound,
        control_plane: &mesh._dir.path().join("cp"),
        peer_state: &peer_state,
        server: &format!("{TD}/api"),
        alpn: "sidewall-h2/1",
        port_header: Some(8080),
    };
    for (kind, name) in [(6, "PING"), (4, "SETTINGS")] {
        let sent = support::h2_control_flood(&target, kind);
        assert!(
            sent.is_some_and(|sent| sent <= 10_000),
            "a {name} flood was still served after {sent:?} frames"
        );
    }
    let metrics = mesh.api.metrics();
    assert_eq!(
        support::metric(
            &metrics,
            "sidewall_proxy_connections_closed_total",
            &[("reason", "control_flood")]
        ),
        2,
        "{metrics}"
    );
    assert_eq!(
        status(&raw(
            mesh.route,
            b"GET /v1/orders HTTP/1.1\r\nHost: api.shop\r\n\r\n"
        )),
        200
    );
}
