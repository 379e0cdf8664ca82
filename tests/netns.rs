//! End to end with containers: each service in its own network namespace on one bridge (see
//! `netns/mod.rs`). Needs root; without it every test here prints `SKIPPED: ...`.
//!
//! So far: the harness itself, and `sidewall iptables install | uninstall` doing for real what
//! transparent mode needs.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::disallowed_methods)] // test helpers panic to report; blocking waits are fine here

#[path = "netns/mod.rs"]
mod netns;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use netns::{Host, SIDEWALL, Topology, User, count, python};

#[test]
fn namespaces_on_the_bridge_reach_each_other_and_the_capture_sees_it() {
    let Some(mut net) = netns::topology(
        "namespaces_on_the_bridge_reach_each_other_and_the_capture_sees_it",
        &["python3"],
    ) else {
        return;
    };
    let client = net.add("client");
    let server = net.add("server");
    net.echo_server(&server, 7);
    for v6 in [false, true] {
        assert_eq!(
            net.call(&client, User::Root, server.ip(v6), 7, "hello"),
            Ok("hello".to_owned()),
            "over {}",
            if v6 { "IPv6" } else { "IPv4" }
        );
    }

    // The capture helper sees plaintext, so a later "zero times" means something.
    if netns::installed("tshark") || netns::installed("tcpdump") {
        let capture = net.capture();
        let marker = "sidewall-marker-5e1f";
        assert_eq!(
            net.call(&client, User::Root, server.ip(false), 7, marker),
            Ok(marker.to_owned())
        );
        let bytes = capture.stop();
        // Once in each direction (more only on a retransmission).
        assert!(
            count(&bytes, marker.as_bytes()) >= 2,
            "the capture ({} bytes) misses the marker",
            bytes.len()
        );
        assert_eq!(count(&bytes, b"sidewall-marker-absent"), 0);
    } else {
        netns::skip(
            "the capture in namespaces_on_the_bridge_reach_each_other_and_the_capture_sees_it",
            "neither tshark nor tcpdump is installed; scripts/test-deps installs tshark",
        );
    }

    net.link_down(&server);
    assert!(
        net.call(&client, User::Root, server.ip(false), 7, "down")
            .is_err()
    );
    net.link_up(&server);
    let deadline = Instant::now() + Duration::from_secs(10);
    for v6 in [false, true] {
        while net.call(&client, User::Root, server.ip(v6), 7, "up") != Ok("up".to_owned()) {
            assert!(Instant::now() < deadline, "the link did not come back");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Stands in for the sidecar's listeners: accepts on each `host:port` argument, reads to EOF,
/// answers `<listener port> <SO_ORIGINAL_DST>` (its own address when the connection was not
/// redirected).
const ORIGINAL_DESTINATION_SERVER: &str = r#"
import selectors, socket, struct, sys
SO_ORIGINAL_DST = 80  # the same number at SOL_IP and at SOL_IPV6
selector = selectors.DefaultSelector()
for arg in sys.argv[1:]:
    host, port = arg.rsplit(":", 1)
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    selector.register(socket.create_server((host, int(port)), family=family), selectors.EVENT_READ)
while True:
    for key, _ in selector.select():
        conn, _ = key.fileobj.accept()
        try:
            with conn:
                conn.settimeout(5)
                while conn.recv(65536):
                    pass
                here = conn.getsockname()
                try:
                    if conn.family == socket.AF_INET:
                        raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
                        ip = socket.inet_ntop(socket.AF_INET, raw[4:8])
                    else:
                        raw = conn.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
                        ip = "[%s]" % socket.inet_ntop(socket.AF_INET6, raw[8:24])
                    port = struct.unpack("!H", raw[2:4])[0]
                except OSError:
                    # No conntrack entry: not redirected, it came here directly.
                    ip, port = here[0] if conn.family == socket.AF_INET else "[%s]" % here[0], here[1]
                conn.sendall(("%d %s:%d" % (here[1], ip, port)).encode())
        except OSError as error:
            print(error, flush=True)
"#;

/// Every rule in the namespace, both families, `nat` and `filter`.
fn rules(net: &Topology, host: &Host) -> String {
    net.exec(
        host,
        User::Root,
        &[
            "sh",
            "-c",
            "iptables -w -t nat -S && iptables -w -S && ip6tables -w -t nat -S && ip6tables -w -S",
        ],
    )
    .ok("list the rules")
}

/// What the stand-in listener on `listener` answers for a connection meant for `to:port`.
fn redirected(listener: u16, to: IpAddr, port: u16) -> Result<String, String> {
    Ok(format!("{listener} {}", SocketAddr::new(to, port)))
}

#[test]
fn iptables_install_sends_the_apps_tcp_to_the_sidecar_and_uninstall_undoes_it() {
    let name = "iptables_install_sends_the_apps_tcp_to_the_sidecar_and_uninstall_undoes_it";
    let tools = ["python3", "setpriv", "iptables", "ip6tables"];
    let Some(mut net) = netns::topology(name, &tools) else {
        return;
    };
    let app = net.add("app");
    let peer = net.add("peer");
    let sidecar = User::Uid(netns::unused_uid());
    let User::Uid(uid) = sidecar else {
        unreachable!()
    };
    let uid = uid.to_string();
    let install = [SIDEWALL, "iptables", "install", "--proxy-uid", &uid];
    let uninstall = [SIDEWALL, "iptables", "uninstall"];
    let loopback = [
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
    ];

    net.echo_server(&peer, 9);
    net.echo_server(&app, 7);
    let mut listeners = net.command(&app, User::Root, python());
    listeners.args(["-c", ORIGINAL_DESTINATION_SERVER]);
    listeners.args(["127.0.0.1:4640", "[::1]:4640", "0.0.0.0:4643", "[::]:4643"]);
    net.spawn("listeners", listeners);
    net.wait_listening(&app, 4640);
    net.wait_listening(&app, 4643);

    let pristine = rules(&net, &app);
    for v6 in [false, true] {
        let direct = net.call(&app, User::Root, peer.ip(v6), 9, "direct");
        assert_eq!(direct, Ok("direct".to_owned()));
    }

    // Install, then install again: the same rules.
    let said = net.exec(&app, User::Root, &install).ok("install");
    assert!(
        said.contains("IPv4: wrote chains SIDEWALL_INBOUND, SIDEWALL_OUTBOUND, SIDEWALL_REDIRECT in the nat table"),
        "{said}"
    );
    assert!(
        said.contains("  -A OUTPUT -p tcp -j SIDEWALL_OUTBOUND (added)"),
        "{said}"
    );
    let installed = rules(&net, &app);
    assert!(installed.contains(&format!(
        "-A SIDEWALL_OUTBOUND -m owner --uid-owner {uid} -j RETURN"
    )));
    let again = net.exec(&app, User::Root, &install).ok("install again");
    assert!(
        again.contains("  -A OUTPUT -p tcp -j SIDEWALL_OUTBOUND (already present)"),
        "{again}"
    );
    assert_eq!(
        rules(&net, &app),
        installed,
        "installing twice changed the rules"
    );

    // The app's TCP, as root or as container root, over IPv4 and IPv6, reaches the outbound
    // listener, which learns where it was going.
    for user in [User::Root, User::ContainerRoot] {
        for v6 in [false, true] {
            assert_eq!(
                net.call(&app, user, peer.ip(v6), 9, "hi"),
                redirected(4640, peer.ip(v6), 9),
                "{user:?}, IPv6: {v6}"
            );
        }
    }
    // The sidecar's own connections go where they are addressed.
    for v6 in [false, true] {
        let direct = net.call(&app, sidecar, peer.ip(v6), 9, "sidecar");
        assert_eq!(direct, Ok("sidecar".to_owned()), "IPv6: {v6}");
    }
    // What stays in the namespace is not redirected: loopback (the sidecar → app hop) and
    // the namespace's own address.
    for user in [sidecar, User::Root] {
        for to in loopback {
            assert_eq!(net.call(&app, user, to, 7, "local"), Ok("local".to_owned()));
        }
    }
    for v6 in [false, true] {
        let own = net.call(&app, User::Root, app.ip(v6), 7, "self");
        assert_eq!(own, Ok("self".to_owned()));
    }
    // Inbound connections to an app port reach the inbound listener.
    for v6 in [false, true] {
        assert_eq!(
            net.call(&peer, User::Root, app.ip(v6), 7, "in"),
            redirected(4643, app.ip(v6), 7)
        );
    }
    // The app, root in a container, cannot take the rules away.
    let attempt = net.exec(&app, User::ContainerRoot, &uninstall);
    assert_eq!(attempt.code, 1, "{attempt:?}");
    assert!(
        attempt.stderr.contains("needs CAP_NET_ADMIN"),
        "{attempt:?}"
    );
    assert_eq!(rules(&net, &app), installed);

    // Where IPv6 cannot be redirected, it is refused: never a way around the sidecar.
    let refuse = [&install[..], &["--ipv6", "refuse"]].concat();
    let said = net
        .exec(&app, User::Root, &refuse)
        .ok("install --ipv6 refuse");
    assert!(
        said.contains("IPv6: wrote chains SIDEWALL_INBOUND, SIDEWALL_OUTBOUND in the filter table"),
        "{said}"
    );
    assert!(
        said.contains("IPv6: deleted chains SIDEWALL_INBOUND, SIDEWALL_OUTBOUND, SIDEWALL_REDIRECT from the nat table"),
        "{said}"
    );
    let refused = net.call(&app, User::Root, peer.ip(true), 9, "v6");
    assert!(
        refused
            .as_ref()
            .is_err_and(|e| e.contains("ConnectionRefusedError")),
        "{refused:?}"
    );
    let inbound = net.call(&peer, User::Root, app.ip(true), 7, "v6 in");
    assert!(
        inbound
            .as_ref()
            .is_err_and(|e| e.contains("ConnectionRefusedError")),
        "{inbound:?}"
    );
    assert_eq!(
        net.call(&app, sidecar, peer.ip(true), 9, "sidecar v6"),
        Ok("sidecar v6".to_owned())
    );
    assert_eq!(
        net.call(&peer, User::Root, app.ip(true), 4643, "to the sidecar"),
        redirected(4643, app.ip(true), 4643),
        "the sidecar's inbound port stays reachable over IPv6"
    );
    assert_eq!(
        net.call(&app, User::Root, IpAddr::V6(Ipv6Addr::LOCALHOST), 7, "lo6"),
        Ok("lo6".to_owned())
    );
    assert_eq!(
        net.call(&app, User::Root, peer.ip(false), 9, "v4"),
        redirected(4640, peer.ip(false), 9)
    );

    // Uninstall removes exactly what install added, and direct connections work again.
    let said = net.exec(&app, User::Root, &uninstall).ok("uninstall");
    assert!(
        said.contains("IPv4: deleted chains SIDEWALL_INBOUND, SIDEWALL_OUTBOUND, SIDEWALL_REDIRECT from the nat table"),
        "{said}"
    );
    assert!(
        said.contains(
            "IPv6: deleted chains SIDEWALL_INBOUND, SIDEWALL_OUTBOUND from the filter table"
        ),
        "{said}"
    );
    assert_eq!(rules(&net, &app), pristine);
    for v6 in [false, true] {
        let out = net.call(&app, User::Root, peer.ip(v6), 9, "direct again");
        assert_eq!(out, Ok("direct again".to_owned()));
        let inbound = net.call(&peer, User::Root, app.ip(v6), 7, "in again");
        assert_eq!(inbound, Ok("in again".to_owned()));
    }
    let said = net.exec(&app, User::Root, &uninstall).ok("uninstall again");
    assert!(
        said.contains("IPv4: no Sidewall rules installed; nothing to remove"),
        "{said}"
    );
    assert_eq!(
        net.log("listeners"),
        "",
        "the stand-in listeners reported errors"
    );
}
