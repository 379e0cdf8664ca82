//! The segmentation report as one HTML page, rendered from its JSON: no script, nothing
//! fetched, the style inline. `sidewall report` writes it beside the signed JSON, and the
//! dashboard serves the latest one (`/report`).

use std::fmt::Write as _;

use sidewall_policies::wire::report::Report;

/// Escapes text for HTML.
fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A table: header cells, then rows of cells (already escaped); `empty` when there are none.
fn table(out: &mut String, id: &str, head: &[&str], rows: &[Vec<String>], empty: &str) {
    if rows.is_empty() {
        let _ = writeln!(out, "<p class=\"none\" id=\"{id}\">{}</p>", esc(empty));
        return;
    }
    let _ = write!(out, "<table id=\"{id}\"><thead><tr>");
    for cell in head {
        let _ = write!(out, "<th>{}</th>", esc(cell));
    }
    out.push_str("</tr></thead><tbody>\n");
    for row in rows {
        out.push_str("<tr>");
        for cell in row {
            let _ = write!(out, "<td>{cell}</td>");
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</tbody></table>\n");
}

/// A section: its number, title and the one sentence saying what it shows and why it matters.
fn section(out: &mut String, number: u8, title: &str, why: &str) {
    let _ = writeln!(
        out,
        "<section id=\"s{number}\"><h2>{number}. {}</h2><p class=\"why\">{}</p>",
        esc(title),
        esc(why)
    );
}

const STYLE: &str = "body{font:14px/1.45 system-ui,sans-serif;color:#1b1f24;max-width:1100px;\
margin:24px auto;padding:0 16px}h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;\
border-bottom:1px solid #d0d7de;padding-bottom:4px;margin-top:28px}.why{color:#444;\
font-style:italic}table{border-collapse:collapse;width:100%;margin:8px 0;font-size:12.5px}\
th,td{border:1px solid #d0d7de;padding:3px 6px;text-align:left;vertical-align:top}\
th{background:#f3f5f7}td.n{text-align:right}.deny{color:#a40e26;font-weight:600}\
.ok{color:#116329;font-weight:600}.none{color:#555}.meta td:first-child{width:220px;\
background:#f8f9fa}code{font-size:12px;word-break:break-all}section{break-inside:auto}\
@media print{body{margin:0}h2{break-after:avoid}}";

/// The report as one HTML page: no script, no external fetch, everything inline.
pub fn html(report: &Report) -> String {
    render(report, true)
}

/// The page the dashboard serves, which anyone who reaches it reads: section 6 (certificate
/// serials, join token ids, revocations) is left to the signed report.
pub fn dashboard_html(report: &Report) -> String {
    render(report, false)
}

fn render(report: &Report, certificates: bool) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">\
         <title>Network segmentation report: {td}</title><style>{STYLE}</style></head><body>\n\
         <h1>Network segmentation report</h1>\n",
        td = esc(&report.scope.trust_domain)
    );
    let meta = [
        ("Trust domain", esc(&report.scope.trust_domain)),
        (
            "Period",
            format!("{} to {}", esc(&report.since), esc(&report.until)),
        ),
        (
            "Generated",
            format!(
                "{} by <code>{}</code>",
                esc(&report.generated_at),
                esc(&report.generated_by)
            ),
        ),
        (
            "Control plane",
            format!(
                "Sidewall {} (replica <code>{}</code>), policy version {} in force",
                esc(&report.scope.control_plane_version),
                esc(&report.scope.replica),
                report.scope.policy_version
            ),
        ),
        (
            "Signature",
            "report.json is signed by the control plane (report.json.sig, chain.pem); \
             the last section says how to check it"
                .to_owned(),
        ),
    ];
    out.push_str("<table class=\"meta\"><tbody>\n");
    for (name, value) in meta {
        let _ = writeln!(out, "<tr><td>{name}</td><td>{value}</td></tr>");
    }
    out.push_str("</tbody></table>\n<p>This page is a reading of <code>report.json</code>, which is the signed \
evidence. Sidewall places a proxy (a <em>sidecar</em>) beside every service; the sidecar accepts a \
connection only over mutual TLS from a peer with a valid certificate, and only when the policy \
allows that peer to reach that port. Each service is named by a SPIFFE ID \
(<code>spiffe://trust-domain/path</code>), carried in its certificate.</p>\n");

    section(
        &mut out,
        1,
        "Scope",
        "Every workload the control plane knows and the sidecar in front of it: whatever is in \
         scope should appear here with its policy applied and a current certificate.",
    );
    let workloads: Vec<Vec<String>> = report
        .scope
        .workloads
        .iter()
        .map(|w| {
            vec![
                format!("<code>{}</code>", esc(&w.identity)),
                esc(&w.instance),
                esc(&w.ports.join(", ")),
                if w.connected {
                    "connected"
                } else {
                    "not connected"
                }
                .to_owned(),
                match w.policy_in_force {
                    Some(true) => "<span class=\"ok\">yes</span>".to_owned(),
                    Some(false) => "<span class=\"deny\">not yet</span>".to_owned(),
                    None => "unknown".to_owned(),
                },
                esc(w.certificate_expires_at.as_deref().unwrap_or("unknown")),
                esc(w.key_type.as_deref().unwrap_or("unknown")),
                esc(w.sidecar_version.as_deref().unwrap_or("unknown")),
            ]
        })
        .collect();
    table(
        &mut out,
        "workloads",
        &[
            "Workload (SPIFFE ID)",
            "Sidecar",
            "Ports",
            "Sidecar now",
            "Policy in force applied",
            "Certificate expires",
            "Key",
            "Sidecar version",
        ],
        &workloads,
        "No workload is registered or connected.",
    );
    out.push_str("<h3>Exceptions</h3>\n");
    let exceptions: Vec<Vec<String>> = report
        .scope
        .exceptions
        .iter()
        .map(|e| {
            vec![
                esc(&e.kind),
                format!("<code>{}</code>", esc(&e.target)),
                esc(&e.detail),
            ]
        })
        .collect();
    table(
        &mut out,
        "exceptions",
        &["Kind", "Target", "What it means"],
        &exceptions,
        "None: every policy in force is enforced, no sidecar accepts plaintext or TLS 1.2, and no \
         app may reach outside the mesh.",
    );
    out.push_str("</section>\n");

    section(
        &mut out,
        2,
        "Segmentation matrix",
        "Who may reach whom, from the policies in force: anything not allowed here is refused \
         (default deny), which is what segmentation means.",
    );
    let _ = writeln!(
        out,
        "<p>Default: <strong>{}</strong>. Denied attempts counted since {}: \
         <strong id=\"denied-attempts\">{}</strong>.</p>",
        esc(&report.segmentation.default),
        esc(&report.observed.counted_since),
        report.segmentation.denied_attempts
    );
    let _ = match &report.segmentation.last_test {
        None => writeln!(
            out,
            "<p id=\"last-test\">Segmentation tested: not since this control plane started \
             (<code>sidewall verify segmentation</code> has each sidecar probe the pairs that must \
             be denied).</p>"
        ),
        Some(t) => {
            let verdict = if !t.finished {
                "<span class=\"deny\">not finished</span>".to_owned()
            } else if t.failures.is_empty() {
                "<span class=\"ok\">every pair refused</span>".to_owned()
            } else {
                format!(
                    "<span class=\"deny\">{} not refused: {}</span>",
                    t.failures.len(),
                    esc(&t.failures.join(", "))
                )
            };
            writeln!(
                out,
                "<p id=\"last-test\">Segmentation tested {} by <code>{}</code> (policy version \
                 {}): {} pairs that must be denied probed by their sources' own sidecars, {} \
                 refused, {} admitted, {} not answered{}; {verdict}.</p>",
                esc(&t.at),
                esc(&t.by),
                t.policy_version,
                t.pairs,
                t.refused,
                t.admitted,
                t.no_answer,
                if t.unprobed > 0 {
                    format!(" ({} more with no sidecar to probe them)", t.unprobed)
                } else {
                    String::new()
                }
            )
        }
    };
    let rules: Vec<Vec<String>> = report
        .segmentation
        .rules
        .iter()
        .map(|r| {
            let action = if r.action == "allow" {
                "allow".to_owned()
            } else {
                "<span class=\"deny\">deny</span>".to_owned()
            };
            vec![
                r.from
                    .iter()
                    .map(|f| format!("<code>{}</code>", esc(f)))
                    .collect::<Vec<_>>()
                    .join("<br>"),
                format!("<code>{}</code>", esc(&r.target)),
                esc(&r.ports),
                esc(&r.http),
                action,
                esc(&r.mode),
                format!("{} rule {}", esc(&r.policy), r.rule),
                format!("<span class=\"n\">{}</span>", r.matched),
            ]
        })
        .collect();
    table(
        &mut out,
        "matrix",
        &[
            "From", "To", "Ports", "HTTP", "Action", "Mode", "Rule", "Observed",
        ],
        &rules,
        "No policy is in force: every connection is refused.",
    );
    out.push_str("</section>\n");

    section(
        &mut out,
        3,
        "Observed against allowed",
        "What actually crossed the network in the period, the rules nothing used (candidates to \
         remove for least privilege), and the attempts that were refused.",
    );
    let _ = writeln!(
        out,
        "<p>Counts from {}, for the flows seen in the period (sidecars report what they decide \
         every few seconds; the control plane adds them up by day, so a flow seen in the period \
         is counted with what it did earlier on the period's first day).</p>",
        esc(&report.observed.counted_since)
    );
    let flows: Vec<Vec<String>> = report
        .observed
        .flows
        .iter()
        .map(|f| {
            vec![
                format!("<code>{}</code>", esc(&f.source)),
                format!("<code>{}</code>", esc(&f.target)),
                format!("{}/{}", f.port, esc(&f.protocol)),
                esc(&f.request),
                f.allowed.to_string(),
                if f.denied > 0 {
                    format!("<span class=\"deny\">{}</span>", f.denied)
                } else {
                    "0".to_owned()
                },
                f.would_deny.to_string(),
                esc(&f.rule),
            ]
        })
        .collect();
    table(
        &mut out,
        "flows",
        &[
            "From",
            "To",
            "Port",
            "Request",
            "Allowed",
            "Denied",
            "Would deny (audit)",
            "Decided by",
        ],
        &flows,
        "No flow was reported in the period.",
    );
    out.push_str("<h3>Allow rules never used</h3>\n");
    let unused: Vec<Vec<String>> = report
        .observed
        .unused_allow_rules
        .iter()
        .map(|r| vec![esc(&r.policy), r.rule.to_string()])
        .collect();
    table(
        &mut out,
        "unused",
        &["Policy", "Rule"],
        &unused,
        "None: every allow rule that can be judged from flows was used (rules naming paths or \
         hosts are not judged: flows keep a path's first segments and no host).",
    );
    out.push_str("<h3>Denied attempts by source and target</h3>\n");
    let denied: Vec<Vec<String>> = report
        .observed
        .denied
        .iter()
        .map(|d| {
            vec![
                format!("<code>{}</code>", esc(&d.source)),
                format!("<code>{}</code>", esc(&d.target)),
                format!("<span class=\"deny\">{}</span>", d.attempts),
            ]
        })
        .collect();
    table(
        &mut out,
        "denied",
        &["From", "To", "Attempts"],
        &denied,
        "None.",
    );
    out.push_str(
        "<h3>Refused at the caller</h3>\n<p>A workload's sidecar knows only the services a \
         policy lets it call: a connection its app opens to any other service (or, in \
         transparent mode, to an address outside the mesh that is not on its egress list) is \
         refused before it leaves the workload's machine.</p>\n",
    );
    let at_caller: Vec<Vec<String>> = report
        .observed
        .refused_at_caller
        .iter()
        .map(|r| {
            vec![
                format!("<code>{}</code>", esc(&r.source)),
                format!("<code>{}</code>", esc(&r.target)),
                r.port.to_string(),
                match r.reason.as_str() {
                    "unknown_service" => "no policy lets it call this service".to_owned(),
                    "not_in_mesh" => {
                        "an address outside the mesh, not on its egress list".to_owned()
                    }
                    other => esc(other),
                },
                format!("<span class=\"deny\">{}</span>", r.attempts),
            ]
        })
        .collect();
    table(
        &mut out,
        "refused-at-caller",
        &["From", "To", "Port", "Why", "Attempts"],
        &at_caller,
        "None.",
    );
    out.push_str("</section>\n");

    section(
        &mut out,
        4,
        "Encryption in transit",
        "Whether traffic between services is encrypted and both ends authenticated: a sidecar \
         accepts a peer only over mutual TLS with a certificate from this trust domain's \
         authority.",
    );
    let lifetimes = match (
        report.encryption.shortest_certificate_hours,
        report.encryption.longest_certificate_hours,
    ) {
        (Some(low), Some(high)) => format!("from {low} to {high} hours"),
        _ => "none issued in the period".to_owned(),
    };
    let _ = writeln!(
        out,
        "<p>Connections and requests between sidecars counted (as in section 3), all over mutual \
         TLS: <strong id=\"mutual-tls\">{}</strong>. Lifetimes of the workload certificates \
         issued in the period: {}. Sidecars accept TLS 1.3 only unless their configuration \
         allows TLS 1.2 (listed under Exceptions).</p>\n<h3>TLS versions and cipher suites in \
         use</h3>",
        report.encryption.mutual_tls,
        esc(&lifetimes)
    );
    let tls: Vec<Vec<String>> = report
        .encryption
        .tls
        .iter()
        .map(|t| vec![esc(&t.version), esc(&t.suite), t.handshakes.to_string()])
        .collect();
    table(
        &mut out,
        "tls",
        &["Version", "Cipher suite", "Handshakes"],
        &tls,
        "No handshake was reported in the period.",
    );
    out.push_str("<h3>Plaintext accepted</h3>\n");
    let plaintext: Vec<Vec<String>> = report
        .encryption
        .plaintext
        .iter()
        .map(|p| {
            vec![
                format!("<code>{}</code>", esc(&p.target)),
                p.port.to_string(),
                format!("<span class=\"deny\">{}</span>", p.connections),
            ]
        })
        .collect();
    table(
        &mut out,
        "plaintext",
        &["Workload", "Port", "Connections"],
        &plaintext,
        "None: no plaintext connection was accepted in the period.",
    );
    out.push_str("</section>\n");

    section(
        &mut out,
        5,
        "Change history",
        "Every change to the segmentation rules in the period, who made it and when, and \
         whether the tamper-evident audit trail that records them is intact.",
    );
    let changes: Vec<Vec<String>> = report
        .changes
        .policy_versions
        .iter()
        .map(|c| {
            vec![
                format!(
                    "{}{}",
                    c.version,
                    if c.in_force { " (in force)" } else { "" }
                ),
                format!("<code>{}</code>", esc(&c.applied_by)),
                esc(&c.applied_at),
                format!("{} policies, {} rules", c.policies, c.rules),
                esc(&[
                    ("added", &c.added),
                    ("removed", &c.removed),
                    ("changed", &c.changed),
                ]
                .iter()
                .filter(|(_, v)| !v.is_empty())
                .map(|(k, v)| format!("{k}: {}", v.replace(',', ", ")))
                .reduce(|a, b| format!("{a}; {b}"))
                .unwrap_or_else(|| {
                    if c.version == 1 {
                        "the first version".to_owned()
                    } else {
                        String::new()
                    }
                })),
                match c.applied_by_sidecars.iter().map(|a| &a.at).max() {
                    Some(last) => format!(
                        "{} sidecar{}, the last at {}",
                        c.applied_by_sidecars.len(),
                        if c.applied_by_sidecars.len() == 1 {
                            ""
                        } else {
                            "s"
                        },
                        esc(last)
                    ),
                    None => "none seen".to_owned(),
                },
            ]
        })
        .collect();
    table(
        &mut out,
        "changes",
        &[
            "Version",
            "Applied by",
            "At",
            "Size",
            "Change",
            "Sidecars applied it",
        ],
        &changes,
        "No policy change in the period.",
    );
    let trail = &report.changes.audit_trail;
    let state = if trail.verified {
        "<span class=\"ok\">intact</span>".to_owned()
    } else {
        format!(
            "<span class=\"deny\">broken: {}</span>",
            esc(trail.error.as_deref().unwrap_or(""))
        )
    };
    let _ = writeln!(
        out,
        "<p>Audit trail: <strong id=\"audit-state\">{state}</strong> when the report was made; \
         {} records, {} in the period; head record {} with hash <code>{}</code>.</p></section>",
        trail.records,
        trail.records_in_period,
        trail.head_seq,
        esc(&trail.head_hash)
    );

    section(
        &mut out,
        6,
        "Certificates",
        "The identities the certificate authority vouched for in the period, and those it \
         withdrew: a revoked identity can no longer reach anything.",
    );
    if certificates {
        write_certificates(&mut out, report);
    } else {
        out.push_str(
            "<p id=\"certificates-elsewhere\">In the signed report that \
             <code>sidewall report</code> writes: this dashboard does not show certificate \
             serials, join tokens or revocations.</p>\n",
        );
    }
    out.push_str("</section>\n");

    section(
        &mut out,
        7,
        "Control mapping",
        "Which controls of common frameworks each section supports. This report is evidence \
         for these controls, not a certification of compliance with any of them.",
    );
    let controls: Vec<Vec<String>> = report
        .controls
        .iter()
        .map(|c| vec![c.section.to_string(), esc(&c.controls.join(", "))])
        .collect();
    table(
        &mut out,
        "controls",
        &["Section", "Controls"],
        &controls,
        "",
    );
    let _ = write!(
        out,
        "</section>\n<section id=\"verify\"><h2>How to check this report</h2><p class=\"why\">\
         Anyone with the trust domain's root certificate (trust-bundle.pem) can check that the \
         control plane signed report.json and that it was not changed since.</p><pre>\
openssl verify -CAfile trust-bundle.pem -untrusted chain.pem chain.pem\n\
openssl x509 -in chain.pem -noout -ext subjectAltName\n\
openssl x509 -in chain.pem -noout -pubkey &gt; control-plane.pub\n\
openssl dgst -sha256 -verify control-plane.pub -signature report.json.sig report.json</pre>\
         <p>The first prints <code>chain.pem: OK</code>; the second must show \
         <code>URI:{td}/sidewall/control-plane</code> (every workload's certificate chains to the \
         same root: this one says the signer is the control plane); the last prints \
         <code>Verified OK</code>. The first command checks the certificate at this moment: a \
         report older than the control plane's certificate (a day) needs <code>-attime</code> \
         with the report's <code>generated_at</code> as Unix seconds.</p></section>\n\
         </body></html>\n",
        td = esc(&report.scope.trust_domain)
    );
    out
}

/// Section 6's tables: certificates issued and revoked.
fn write_certificates(out: &mut String, report: &Report) {
    let issued: Vec<Vec<String>> = report
        .certificates
        .issued
        .iter()
        .map(|c| {
            vec![
                format!("<code>{}</code>", esc(&c.identity)),
                esc(&c.kind),
                esc(&c.issued_at),
                esc(&c.not_after),
                esc(&c.authenticated_by),
                esc(c.key_type.as_deref().unwrap_or("")),
            ]
        })
        .collect();
    table(
        out,
        "issued",
        &[
            "Identity",
            "Kind",
            "Issued",
            "Expires",
            "Proof of identity",
            "Key",
        ],
        &issued,
        "No certificate was issued in the period.",
    );
    out.push_str("<h3>Revoked</h3>\n");
    let revoked: Vec<Vec<String>> = report
        .certificates
        .revoked
        .iter()
        .map(|r| {
            vec![
                format!("<code>{}</code>", esc(&r.value)),
                esc(&r.kind),
                esc(&r.at),
                format!("<code>{}</code>", esc(&r.by)),
            ]
        })
        .collect();
    table(
        out,
        "revoked",
        &["Revoked", "Kind", "At", "By"],
        &revoked,
        "Nothing was revoked in the period.",
    );
    out.push_str("<h3>CA rotations</h3>\n");
    let rotations: Vec<Vec<String>> = report
        .certificates
        .ca_rotations
        .iter()
        .map(|r| {
            vec![
                esc(&r.at),
                esc(&r.rotation),
                esc(&r.step),
                format!("<code>{}</code>", esc(&r.old_root_sha256)),
                format!("<code>{}</code>", esc(&r.new_root_sha256)),
                if r.forced { "yes" } else { "no" }.to_owned(),
                format!("<code>{}</code>", esc(&r.by)),
            ]
        })
        .collect();
    table(
        out,
        "ca-rotations",
        &[
            "At", "Rotation", "Step", "Old root", "New root", "Forced", "By",
        ],
        &rotations,
        "The CA's root was not rotated in the period.",
    );
}
