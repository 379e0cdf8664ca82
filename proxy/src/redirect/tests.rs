use std::collections::BTreeMap;

use super::*;

fn ports(list: &[&str]) -> Vec<PortRange> {
    list.iter().map(|p| PortRange::parse(p).unwrap()).collect()
}

fn uid_plan() -> RedirectPlan {
    RedirectPlan::new(Options {
        proxy_uid: Some(1337),
        ..Options::default()
    })
    .unwrap()
}

fn lines(ruleset: &Ruleset) -> Vec<String> {
    ruleset
        .rules
        .iter()
        .chain(&ruleset.jumps)
        .map(ToString::to_string)
        .collect()
}

#[test]
fn default_plan_redirects_everything_but_the_sidecar_and_loopback() {
    let ruleset = uid_plan().rules(Family::Ipv4, Treatment::Redirect);
    assert_eq!(ruleset.chains, CHAINS.to_vec());
    assert_eq!(
        lines(&ruleset),
        [
            "-A SIDEWALL_INBOUND -p tcp --dport 4643 -j RETURN",
            "-A SIDEWALL_INBOUND -p tcp --dport 4691 -j RETURN",
            "-A SIDEWALL_INBOUND -p tcp -j REDIRECT --to-ports 4643",
            "-A SIDEWALL_OUTBOUND -m owner --uid-owner 1337 -j RETURN",
            "-A SIDEWALL_OUTBOUND -o lo -j RETURN",
            "-A SIDEWALL_OUTBOUND -j SIDEWALL_REDIRECT",
            "-A SIDEWALL_REDIRECT -p tcp -j REDIRECT --to-ports 4640",
            "-A PREROUTING -p tcp -j SIDEWALL_INBOUND",
            "-A OUTPUT -p tcp -j SIDEWALL_OUTBOUND",
        ]
    );
    // IPv6 redirects the same way (`-o lo` covers ::1 as it covers 127.0.0.0/8).
    let v6 = uid_plan().rules(Family::Ipv6, Treatment::Redirect);
    assert_eq!(lines(&v6), lines(&ruleset));
}

#[test]
fn restore_input_rewrites_our_chains_and_inserts_only_the_missing_jumps() {
    let ruleset = uid_plan().rules(Family::Ipv4, Treatment::Redirect);
    let text = ruleset.restore_input(&[&ruleset.jumps[1]]);
    assert!(text.starts_with(
        "*nat\n:SIDEWALL_INBOUND - [0:0]\n:SIDEWALL_OUTBOUND - [0:0]\n:SIDEWALL_REDIRECT - [0:0]\n-A SIDEWALL_INBOUND "
    ));
    assert!(text.ends_with("-I OUTPUT 1 -p tcp -j SIDEWALL_OUTBOUND\nCOMMIT\n"));
    assert!(!text.contains("PREROUTING"));
}

#[test]
fn listed_ports_exclusions_ranges_and_a_mark() {
    let plan = RedirectPlan::new(Options {
        listeners: ListenerPorts {
            inbound: 15006,
            outbound: 15001,
            admin: 15020,
        },
        inbound_ports: Some(ports(&["8080", "9000-9010"])),
        exclude_inbound_ports: ports(&["9005"]),
        exclude_outbound_ports: ports(&["53", "5432-5433"]),
        proxy_mark: Some(0x539),
        ..Options::default()
    })
    .unwrap();
    assert_eq!(
        lines(&plan.rules(Family::Ipv4, Treatment::Redirect)),
        [
            "-A SIDEWALL_INBOUND -p tcp --dport 15006 -j RETURN",
            "-A SIDEWALL_INBOUND -p tcp --dport 15020 -j RETURN",
            "-A SIDEWALL_INBOUND -p tcp --dport 9005 -j RETURN",
            "-A SIDEWALL_INBOUND -p tcp --dport 8080 -j REDIRECT --to-ports 15006",
            "-A SIDEWALL_INBOUND -p tcp --dport 9000:9010 -j REDIRECT --to-ports 15006",
            "-A SIDEWALL_OUTBOUND -m mark --mark 0x539 -j RETURN",
            "-A SIDEWALL_OUTBOUND -o lo -j RETURN",
            "-A SIDEWALL_OUTBOUND -p tcp --dport 53 -j RETURN",
            "-A SIDEWALL_OUTBOUND -p tcp --dport 5432:5433 -j RETURN",
            "-A SIDEWALL_OUTBOUND -j SIDEWALL_REDIRECT",
            "-A SIDEWALL_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
            "-A PREROUTING -p tcp -j SIDEWALL_INBOUND",
            "-A OUTPUT -p tcp -j SIDEWALL_OUTBOUND",
        ]
    );
}

#[test]
fn refusing_ipv6_rejects_new_connections_in_the_filter_table() {
    let ruleset = uid_plan().rules(Family::Ipv6, Treatment::Refuse);
    assert_eq!(ruleset.treatment.table(), "filter");
    assert_eq!(ruleset.chains, [INBOUND_CHAIN, OUTBOUND_CHAIN]);
    assert_eq!(
        lines(&ruleset),
        [
            "-A SIDEWALL_INBOUND -i lo -j RETURN",
            "-A SIDEWALL_INBOUND -p tcp --dport 4643 -j RETURN",
            "-A SIDEWALL_INBOUND -p tcp --dport 4691 -j RETURN",
            "-A SIDEWALL_INBOUND -p tcp --syn -j REJECT --reject-with tcp-reset",
            "-A SIDEWALL_OUTBOUND -m owner --uid-owner 1337 -j RETURN",
            "-A SIDEWALL_OUTBOUND -o lo -j RETURN",
            "-A SIDEWALL_OUTBOUND -p tcp --syn -j REJECT --reject-with tcp-reset",
            "-A INPUT -p tcp -j SIDEWALL_INBOUND",
            "-A OUTPUT -p tcp -j SIDEWALL_OUTBOUND",
        ]
    );
}

#[test]
fn exemptions_that_match_the_app_or_everyone_are_refused() {
    let plan = |proxy_uid, proxy_mark| {
        RedirectPlan::new(Options {
            proxy_uid,
            proxy_mark,
            ..Options::default()
        })
    };
    assert!(matches!(plan(Some(0), None), Err(RedirectError::RootUid)));
    assert!(matches!(plan(None, Some(0)), Err(RedirectError::ZeroMark)));
    assert!(matches!(
        plan(Some(1337), Some(7)),
        Err(RedirectError::Exemption)
    ));
    assert!(matches!(plan(None, None), Err(RedirectError::Exemption)));
    assert!(
        RedirectError::RootUid
            .to_string()
            .contains("every process running as root")
    );
    assert_eq!(plan(None, Some(7)).unwrap().exemption(), Exemption::Mark(7));
}

#[test]
fn the_sidecars_own_ports_are_not_app_ports() {
    let with = |inbound_ports: &[&str], listeners: ListenerPorts| {
        RedirectPlan::new(Options {
            listeners,
            inbound_ports: Some(ports(inbound_ports)),
            proxy_uid: Some(1337),
            ..Options::default()
        })
    };
    let defaults = ListenerPorts::default();
    assert!(matches!(
        with(&["4600-4700"], defaults),
        Err(RedirectError::OwnPort {
            port: 4643,
            listener: "inbound"
        })
    ));
    assert!(matches!(
        with(&["4691"], defaults),
        Err(RedirectError::OwnPort {
            port: 4691,
            listener: "admin"
        })
    ));
    let shared = ListenerPorts {
        outbound: 4643,
        ..defaults
    };
    assert!(matches!(
        with(&["80"], shared),
        Err(RedirectError::Listeners(m)) if m.contains("share port 4643")
    ));
}

#[test]
fn listener_ports_come_from_a_sidecar_config_leniently() {
    let config = "identity: spiffe://example.org/ns/shop/svc/api\n\
                  futureField: {anything: [1, 2]}\n\
                  inbound:\n  listen: 0.0.0.0:5643\n  ports: [{port: 8080, app: 127.0.0.1:8080}]\n\
                  outbound:\n  transparent: {listen: 127.0.0.1:5640, egress: []}\n\
                  admin: {listen: 127.0.0.1:5691}\n";
    assert_eq!(
        ListenerPorts::from_yaml("api.yaml", config).unwrap(),
        ListenerPorts {
            inbound: 5643,
            outbound: 5640,
            admin: 5691
        }
    );
    let short = "outbound: {transparent: 127.0.0.1:6640}\n";
    assert_eq!(
        ListenerPorts::from_yaml("a.yaml", short).unwrap().outbound,
        6640
    );
    let enabled = "inbound: {listen: '[::]:7643'}\noutbound: {transparent: true}\n";
    assert_eq!(
        ListenerPorts::from_yaml("a.yaml", enabled).unwrap(),
        ListenerPorts {
            inbound: 7643,
            ..ListenerPorts::default()
        }
    );
    assert_eq!(
        ListenerPorts::from_yaml("a.yaml", "identity: x\n").unwrap(),
        ListenerPorts::default()
    );
    let zero = ListenerPorts::from_yaml("a.yaml", "inbound: {listen: 127.0.0.1:0}\n");
    assert!(matches!(zero, Err(RedirectError::Listeners(m)) if m.contains("port 0")));
    let bad = ListenerPorts::from_yaml("a.yaml", "inbound: {listen: nowhere}\n");
    assert!(matches!(bad, Err(RedirectError::Config(e)) if e.to_string().starts_with("a.yaml:")));
}

/// An in-memory iptables: user chains, rules, the commands `install` and `uninstall` use.
#[derive(Default)]
struct Model {
    /// (program, table) → chain → rules (specs); built-in chains are upper-case words.
    tables: BTreeMap<(String, String), BTreeMap<String, Vec<String>>>,
    ipv6: bool,
    /// Programs that are not installed.
    missing: Vec<&'static str>,
    /// Whether ip6tables has no nat table.
    no_nat6: bool,
    calls: Vec<String>,
}

impl Model {
    fn new() -> Self {
        let mut model = Model {
            ipv6: true,
            ..Model::default()
        };
        for program in ["iptables", "ip6tables"] {
            for (table, chains) in [
                ("nat", &["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"][..]),
                ("filter", &["INPUT", "FORWARD", "OUTPUT"][..]),
            ] {
                let chains = chains.iter().map(|c| (c.to_string(), vec![])).collect();
                model
                    .tables
                    .insert((program.to_owned(), table.to_owned()), chains);
            }
            // Someone else's rules, which nothing here may touch.
            let nat = model.table(program, "nat");
            nat.insert("DOCKER".into(), vec!["-p tcp -j RETURN".into()]);
            nat.get_mut("OUTPUT")
                .unwrap()
                .push("-p tcp -j DOCKER".into());
        }
        model
    }

    fn table(&mut self, program: &str, table: &str) -> &mut BTreeMap<String, Vec<String>> {
        let program = program.trim_end_matches("-restore").to_owned();
        self.tables.get_mut(&(program, table.to_owned())).unwrap()
    }

    fn listing(&mut self, program: &str, table: &str) -> String {
        let mut text = String::new();
        let chains = self.table(program, table);
        for name in chains.keys().filter(|c| !is_builtin(c)) {
            text.push_str(&format!("-N {name}\n"));
        }
        for (name, rules) in chains.iter() {
            for rule in rules {
                text.push_str(&format!("-A {name} {rule}\n"));
            }
        }
        text
    }

    fn command(&mut self, program: &str, args: &[&str]) -> Result<(), String> {
        let ["-w", "-t", table, op, chain, rest @ ..] = args else {
            return Err(format!("unexpected {args:?}"));
        };
        let spec = rest.join(" ");
        let referenced = self
            .listing(program, table)
            .contains(&format!("-j {chain}"));
        let chains = self.table(program, table);
        let rules = chains.get_mut(*chain).ok_or("no chain")?;
        match *op {
            "-C" => rules.contains(&spec).then_some(()).ok_or("no rule".into()),
            "-D" => {
                let at = rules.iter().position(|r| *r == spec).ok_or("no rule")?;
                rules.remove(at);
                Ok(())
            }
            "-F" => {
                rules.clear();
                Ok(())
            }
            "-X" if rules.is_empty() && !referenced => {
                chains.remove(*chain);
                Ok(())
            }
            _ => Err(format!("cannot {args:?}")),
        }
    }

    fn restore(&mut self, program: &str, input: &str) -> Result<(), String> {
        let table = input.lines().next().unwrap().trim_start_matches('*');
        if self.no_nat6 && program == "ip6tables-restore" && table == "nat" {
            return Err("can't initialize ip6tables table `nat'".into());
        }
        // One transaction: work on a copy.
        let mut chains = self.table(program, table).clone();
        for line in input.lines().skip(1) {
            let words: Vec<&str> = line.split(' ').collect();
            match words.as_slice() {
                ["COMMIT"] => {}
                [declared, "-", "[0:0]"] => {
                    chains.insert(declared.trim_start_matches(':').into(), vec![]);
                }
                ["-A", chain, spec @ ..] => {
                    chains
                        .get_mut(*chain)
                        .ok_or("no chain")?
                        .push(spec.join(" "));
                }
                ["-I", chain, "1", spec @ ..] => {
                    chains
                        .get_mut(*chain)
                        .ok_or("no chain")?
                        .insert(0, spec.join(" "));
                }
                _ => return Err(format!("bad line {line}")),
            }
        }
        *self.table(program, table) = chains;
        Ok(())
    }

    fn save(&mut self) -> String {
        ["iptables", "ip6tables"]
            .iter()
            .flat_map(|p| ["nat", "filter"].map(|t| (p, t)))
            .map(|(p, t)| format!("{p} {t}\n{}", self.listing(p, t)))
            .collect()
    }
}

fn is_builtin(chain: &str) -> bool {
    chain.chars().all(|c| c.is_ascii_uppercase()) && chain != "DOCKER"
}

impl Netfilter for Model {
    fn run(
        &mut self,
        program: &str,
        args: &[&str],
        input: Option<&str>,
    ) -> Result<CommandOutput, RedirectError> {
        self.calls.push(format!("{program} {}", args.join(" ")));
        let base = program.trim_end_matches("-restore");
        if self.missing.contains(&base) {
            return Err(RedirectError::Missing {
                program: program.to_owned(),
            });
        }
        let result = match (args, input) {
            (["-w", "-t", table, "-S"], None) => Ok(self.listing(program, table)),
            (["-w", "--noflush"], Some(text)) => {
                self.restore(program, text).map(|()| String::new())
            }
            (_, None) => self.command(program, args).map(|()| String::new()),
            _ => Err("unexpected input".into()),
        };
        Ok(match result {
            Ok(stdout) => CommandOutput {
                success: true,
                stdout,
                stderr: String::new(),
            },
            Err(stderr) => CommandOutput {
                success: false,
                stdout: String::new(),
                stderr,
            },
        })
    }

    fn has_ipv6(&self) -> bool {
        self.ipv6
    }
}

#[test]
fn install_twice_is_install_once_and_uninstall_restores_the_rest() {
    let mut model = Model::new();
    let pristine = model.save();
    let report = install(&uid_plan(), Ipv6Choice::Auto, &mut model).unwrap();
    let once = model.save();
    assert!(once.contains("iptables nat\n-N DOCKER\n-N SIDEWALL_INBOUND\n"));
    assert!(once.contains("-A OUTPUT -p tcp -j SIDEWALL_OUTBOUND\n-A OUTPUT -p tcp -j DOCKER\n"));
    assert!(
        report
            .iter()
            .any(|l| l == "  -A OUTPUT -p tcp -j SIDEWALL_OUTBOUND (added)")
    );
    assert!(report.iter().any(|l| l.starts_with("IPv6: wrote chains")));

    let again = install(&uid_plan(), Ipv6Choice::Auto, &mut model).unwrap();
    assert_eq!(model.save(), once);
    assert!(
        again
            .iter()
            .any(|l| l.ends_with("SIDEWALL_OUTBOUND (already present)"))
    );

    let removed = uninstall(&mut model).unwrap();
    assert_eq!(model.save(), pristine);
    assert!(
        removed
            .iter()
            .any(|l| l
                == "IPv4: removed -A PREROUTING -p tcp -j SIDEWALL_INBOUND from the nat table")
    );
    let nothing = uninstall(&mut model).unwrap();
    assert_eq!(
        nothing,
        [
            "IPv4: no Sidewall rules installed; nothing to remove",
            "IPv6: no Sidewall rules installed; nothing to remove",
        ]
    );
}

#[test]
fn without_ipv6_nat_new_ipv6_connections_are_refused() {
    let mut model = Model::new();
    model.no_nat6 = true;
    let report = install(&uid_plan(), Ipv6Choice::Auto, &mut model).unwrap();
    assert!(
        report
            .iter()
            .any(|l| l.contains("refusing new IPv6 TCP connections"))
    );
    let saved = model.save();
    assert!(saved.contains("ip6tables filter\n-N SIDEWALL_INBOUND\n-N SIDEWALL_OUTBOUND\n"));
    assert!(saved.contains("-A SIDEWALL_OUTBOUND -p tcp --syn -j REJECT --reject-with tcp-reset"));

    // Asked to redirect where it cannot: an error, not a silent bypass.
    let mut strict = Model::new();
    strict.no_nat6 = true;
    let error = install(&uid_plan(), Ipv6Choice::Redirect, &mut strict).unwrap_err();
    assert!(error.to_string().contains("table `nat'"), "{error}");
}

#[test]
fn switching_ipv6_treatment_leaves_one_table_in_use() {
    let mut model = Model::new();
    install(&uid_plan(), Ipv6Choice::Auto, &mut model).unwrap();
    let report = install(&uid_plan(), Ipv6Choice::Refuse, &mut model).unwrap();
    let saved = model.save();
    let nat6 = saved.split("ip6tables nat\n").nth(1).unwrap();
    let nat6 = nat6.split("ip6tables filter\n").next().unwrap();
    assert!(!nat6.contains("SIDEWALL"), "{nat6}");
    assert!(report.iter().any(|l| l.starts_with("IPv6: deleted chains")));
}

#[test]
fn ipv6_that_cannot_be_guarded_is_an_error_unless_the_kernel_has_none() {
    let mut model = Model::new();
    model.missing = vec!["ip6tables"];
    let error = install(&uid_plan(), Ipv6Choice::Auto, &mut model).unwrap_err();
    assert!(
        matches!(error, RedirectError::Ipv6Unguarded { .. }),
        "{error}"
    );

    let mut no_ipv6 = Model::new();
    no_ipv6.missing = vec!["ip6tables"];
    no_ipv6.ipv6 = false;
    let report = install(&uid_plan(), Ipv6Choice::Auto, &mut no_ipv6).unwrap();
    assert!(report.iter().any(|l| l.starts_with("IPv6: not available")));
    assert!(no_ipv6.calls.iter().all(|c| !c.starts_with("ip6tables")));
}

#[test]
fn a_missing_iptables_is_named() {
    let mut model = Model::new();
    model.missing = vec!["iptables"];
    let error = install(&uid_plan(), Ipv6Choice::Auto, &mut model).unwrap_err();
    assert_eq!(
        error.to_string(),
        "iptables not found: install iptables (nft backend), e.g. `apt-get install iptables`"
    );
    let report = uninstall(&mut model).unwrap();
    assert_eq!(report[0], "IPv4: iptables not found; nothing to remove");
}
