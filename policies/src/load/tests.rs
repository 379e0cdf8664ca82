use std::fs;

use super::*;
use crate::SpiffeId;

/// The start of a valid policy; line 4 is `  name: p`, `spec:` goes on line 5.
const HEAD: &str = "apiVersion: sidewall.dev/v1\nkind: Policy\nmetadata:\n  name: p\n";
/// A valid spec start: target on line 6, `rules:` on line 7, the first rule from line 8.
const SPEC: &str = "spec:\n  target: spiffe://example.org/ns/a/svc/api\n  rules:\n";
const RULE: &str = "    - action: allow\n      from: [spiffe://example.org/ns/a/svc/web]\n";

fn load(text: &str) -> Result<Loaded, LoadErrors> {
    load_str("f.yaml", text, &LoadOptions::default())
}

/// One invalid input per row: the error's line, column and a piece of its message.
#[test]
fn invalid_policy_files_report_line_column_and_message() {
    let cases: Vec<(String, usize, usize, &str)> = vec![
        // 1. unknown field (a typo)
        (format!("{HEAD}{SPEC}{RULE}  tagret: x\n"), 10, 3, "unknown field `tagret`, expected one of `target`, `mode`, `onRevoke`, `addresses`, `rules`"),
        // 2. duplicate key: reported at its second occurrence, not at the enclosing mapping
        (format!("{HEAD}spec:\n  target: spiffe://example.org/a\n  target: spiffe://example.org/b\n  rules: []\n"), 7, 3, "duplicate key `target`"),
        // 3. duplicate key in a rule
        (format!("{HEAD}{SPEC}{RULE}      action: deny\n"), 10, 7, "duplicate key `action`"),
        // 4. wrong type
        (format!("{HEAD}{SPEC}{RULE}      ports: 8080\n"), 10, 14, "invalid type: integer `8080`, expected a non-empty list"),
        // 5. unknown apiVersion
        ("apiVersion: sidewall.dev/v2\nkind: Policy\n".into(), 1, 13, "unknown apiVersion \"sidewall.dev/v2\""),
        // 6. unknown kind
        ("apiVersion: sidewall.dev/v1\nkind: Polcy\n".into(), 2, 7, "unknown kind \"Polcy\""),
        // 7. missing apiVersion
        ("kind: Policy\nmetadata: {name: p}\n".into(), 1, 1, "missing field `apiVersion`"),
        // 8. invalid target identity
        (format!("{HEAD}spec:\n  target: spiffe://Example.org/a\n  rules: []\n"), 6, 11, "trust domain contains uppercase 'E'"),
        // 9. invalid identity in from
        (format!("{HEAD}{SPEC}    - action: allow\n      from: [spiffe://example.org/ns//a]\n"), 9, 14, "empty path segment"),
        // 10. wildcard not last
        (format!("{HEAD}{SPEC}    - action: allow\n      from: [\"spiffe://example.org/*/svc\"]\n"), 9, 14, "may only be the final segment"),
        // 11. empty from
        (format!("{HEAD}{SPEC}    - action: allow\n      from: []\n"), 9, 13, "spec.rules[0].from: empty list"),
        // 12. missing from
        (format!("{HEAD}{SPEC}    - action: allow\n"), 8, 7, "missing field `from`"),
        // 13. port 0
        (format!("{HEAD}{SPEC}{RULE}      ports: [0]\n"), 10, 15, "port 0 is out of range"),
        // 14. port range out of order
        (format!("{HEAD}{SPEC}{RULE}      ports: [\"9010-9000\"]\n"), 10, 15, "port range 9010-9000 is out of order"),
        // 15. port too large
        (format!("{HEAD}{SPEC}{RULE}      ports: [70000]\n"), 10, 15, "port 70000 is out of range"),
        // 16. http path not starting with '/'
        (format!("{HEAD}{SPEC}{RULE}      http: {{paths: [v1/orders]}}\n"), 10, 22, "path must start with '/'"),
        // 17. `**` not last
        (format!("{HEAD}{SPEC}{RULE}      http:\n        paths: [\"/static/**/x\"]\n"), 11, 17, "'**' may only be the last segment"),
        // 18. lowercase method
        (format!("{HEAD}{SPEC}{RULE}      http:\n        methods: [get]\n"), 11, 19, "HTTP methods are case-sensitive (write \"GET\")"),
        // 19. unknown action
        (format!("{HEAD}{SPEC}    - action: permit\n      from: [spiffe://example.org/b]\n"), 8, 15, "unknown variant `permit`, expected `allow` or `deny`"),
        // 20. unknown mode
        (format!("{HEAD}spec:\n  target: spiffe://example.org/a\n  mode: enforced\n  rules: []\n"), 7, 9, "unknown variant `enforced`, expected `enforce` or `audit`"),
        // 21. bad onRevoke
        (format!("{HEAD}spec:\n  target: spiffe://example.org/a\n  onRevoke: drain:forever\n  rules: []\n"), 7, 13, "duration \"forever\""),
        // 22. invalid policy name
        ("apiVersion: sidewall.dev/v1\nkind: Policy\nmetadata:\n  name: \"bad name\"\nspec: {target: spiffe://example.org/a, rules: []}\n".into(), 4, 9, "policy name \"bad name\""),
        // 23. YAML syntax error
        (format!("{HEAD}spec: [\n"), 6, 1, "did not find expected node content"),
        // 24. a document that is not a mapping
        ("- 1\n- 2\n".into(), 1, 1, "expected a document (a mapping with apiVersion, kind, metadata and spec)"),
        // 25. host wildcard in the middle
        (format!("{HEAD}{SPEC}{RULE}      http: {{hosts: [\"api.*.shop\"]}}\n"), 10, 22, "'*' may only be the whole first label"),
        // 26. unknown field inside http
        (format!("{HEAD}{SPEC}{RULE}      http: {{verbs: [GET]}}\n"), 10, 14, "unknown field `verbs`, expected one of `methods`, `paths`, `hosts`"),
        // 27. missing rules
        (format!("{HEAD}spec:\n  target: spiffe://example.org/a\n"), 6, 3, "missing field `rules`"),
        // 28. an address that is not IP:port
        (format!("{HEAD}{SPEC}{RULE}  addresses: [api.shop:80]\n"), 10, 15, "invalid socket address"),
        // 29. an error in the second document keeps its line in the file
        (format!("{HEAD}{SPEC}{RULE}---\n{}spec:\n  target: spiffe://example.org/a/\n  rules: []\n", HEAD.replace("name: p", "name: q")), 16, 11, "trailing '/'"),
    ];
    assert!(cases.len() >= 20);
    for (i, (text, line, column, message)) in cases.iter().enumerate() {
        let errors = load(text).expect_err(&format!("case {}: loaded", i + 1)).0;
        assert_eq!(errors.len(), 1, "case {}: {errors:?}", i + 1);
        let error = &errors[0];
        assert_eq!(
            error.location.position,
            Some((*line, *column)),
            "case {}: {error}",
            i + 1
        );
        let shown = error.to_string();
        assert!(shown.contains(message), "case {}: {shown}", i + 1);
        assert!(
            shown.starts_with(&format!("f.yaml:{line}:{column}: ")),
            "{shown}"
        );
        assert!(
            shown.contains("(hint: "),
            "case {}: no hint in {shown}",
            i + 1
        );
    }
}

#[test]
fn every_error_is_reported_and_nothing_half_loads() {
    let text = format!(
        "{HEAD}spec:\n  target: spiffe://example.org/a/\n  rules: []\n---\n{}spec:\n  target: spiffe://example.org/b\n  rules: []\n---\n{}spec:\n  target: spiffe://example.org/c\n  mode: shadow\n  rules: []\n",
        HEAD.replace("name: p", "name: ok"),
        HEAD.replace("name: p", "name: r"),
    );
    let errors = load(&text).unwrap_err().0;
    let positions: Vec<_> = errors.iter().map(|e| e.location.position).collect();
    assert_eq!(positions, vec![Some((6, 11)), Some((23, 9))], "{errors:?}");
}

#[test]
fn duplicate_names_across_files_point_at_both() {
    let a = Source {
        name: "a.yaml".into(),
        text: format!("{HEAD}{SPEC}{RULE}"),
    };
    let b = Source {
        name: "b.yaml".into(),
        text: format!("# comment\n---\n{HEAD}{SPEC}{RULE}"),
    };
    let errors = load_sources(&[a, b], &LoadOptions::default()).unwrap_err();
    assert_eq!(
        errors.to_string(),
        "b.yaml:6:9: policy name \"p\" is already used at a.yaml:4:9 (hint: give each policy a unique metadata.name)"
    );
}

#[test]
fn addresses_belong_to_one_exact_target() {
    let policy = |name: &str, target: &str, addresses: &str| {
        format!(
            "{}spec:\n  target: spiffe://example.org/ns/a/svc/{target}\n  addresses: [{addresses}]\n  rules: []\n---\n",
            HEAD.replace("name: p", &format!("name: {name}"))
        )
    };
    let loaded = load(
        &(policy("a", "api", "\"10.96.0.10:80\"")
            + &policy("b", "api", "\"10.96.0.10:80\", \"[fd00::1]:80\"")),
    )
    .unwrap();
    let api = SpiffeId::parse("spiffe://example.org/ns/a/svc/api").unwrap();
    let web = SpiffeId::parse("spiffe://example.org/ns/a/svc/web").unwrap();
    assert!(
        loaded
            .policies
            .declares(&api, "[fd00::1]:80".parse().unwrap())
    );
    assert!(
        !loaded
            .policies
            .declares(&web, "10.96.0.10:80".parse().unwrap())
    );
    assert!(
        !loaded
            .policies
            .declares(&api, "10.96.0.10:81".parse().unwrap())
    );

    let errors =
        load(&(policy("a", "api", "\"10.96.0.10:80\"") + &policy("b", "web", "\"10.96.0.10:80\"")))
            .unwrap_err();
    assert_eq!(
        errors.to_string(),
        "f.yaml:13:9: address 10.96.0.10:80 is declared for spiffe://example.org/ns/a/svc/api at f.yaml:4:9 (hint: an address belongs to one service: declare it for one target only)"
    );
    let errors = load(&policy("a", "*", "\"10.96.0.10:80\"")).unwrap_err();
    assert!(
        errors
            .to_string()
            .contains("spec.addresses needs an exact target"),
        "{errors}"
    );
}

#[test]
fn rule_cap_and_size_cap() {
    let options = LoadOptions {
        max_rules: 2,
        ..LoadOptions::default()
    };
    let text = format!("{HEAD}{SPEC}{RULE}{RULE}{RULE}");
    let errors = load_str("f.yaml", &text, &options).unwrap_err();
    assert_eq!(errors.0.len(), 1);
    assert!(
        errors
            .to_string()
            .starts_with("f.yaml:4:9: the policy set has more than 2 rules")
    );
    assert!(load_str("f.yaml", &format!("{HEAD}{SPEC}{RULE}{RULE}"), &options).is_ok());

    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.yaml");
    fs::write(
        &big,
        format!("{HEAD}{SPEC}{RULE}# {}\n", "x".repeat(1024 * 1024)),
    )
    .unwrap();
    let errors = load_paths(&[&big], &LoadOptions::default()).unwrap_err();
    assert!(
        errors.to_string().contains("over the 1048576-byte limit"),
        "{errors}"
    );
}

#[test]
fn files_are_found_recursively_and_others_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    fs::create_dir_all(root.join("team/sub")).unwrap();
    fs::create_dir_all(root.join(".git")).unwrap();
    fs::write(root.join("a.yaml"), format!("{HEAD}{SPEC}{RULE}")).unwrap();
    fs::write(
        root.join("team/sub/b.yml"),
        format!("{}{SPEC}{RULE}---\napiVersion: sidewall.dev/v1\nkind: PolicyTest\nmetadata: {{name: t}}\nspec: {{cases: []}}\n", HEAD.replace("name: p", "name: b")),
    )
    .unwrap();
    fs::write(root.join("team/notes.txt"), "not yaml").unwrap();
    fs::write(root.join(".git/x.yaml"), "garbage: [").unwrap();
    let loaded = load_paths(&[root], &LoadOptions::default()).unwrap();
    assert_eq!(loaded.files, 2);
    let names: Vec<_> = loaded
        .policies
        .policies()
        .iter()
        .map(|p| p.name.to_string())
        .collect();
    assert_eq!(names, ["b", "p"]);
    assert_eq!(loaded.skipped.get("PolicyTest"), Some(&1));
    assert!(loaded.tests.is_empty());

    let with_tests = load_paths(
        &[root],
        &LoadOptions {
            tests: true,
            ..LoadOptions::default()
        },
    )
    .unwrap();
    assert_eq!(with_tests.tests.len(), 1);
    assert!(with_tests.skipped.is_empty());
}

#[test]
fn missing_paths_empty_dirs_and_binary_files() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    let err = load_paths(&[&missing], &LoadOptions::default()).unwrap_err();
    assert!(
        err.to_string()
            .ends_with("nope: no such file or directory (hint: check the path)"),
        "{err}"
    );
    let empty = dir.path().join("empty");
    fs::create_dir(&empty).unwrap();
    let err = load_paths(&[&empty], &LoadOptions::default()).unwrap_err();
    assert!(
        err.to_string().contains("no *.yaml or *.yml files found"),
        "{err}"
    );
    let binary = dir.path().join("b.yaml");
    fs::write(&binary, [0xff, 0xfe, 0x00]).unwrap();
    let err = load_paths(&[&binary], &LoadOptions::default()).unwrap_err();
    assert!(err.to_string().contains("not valid UTF-8"), "{err}");
}

#[test]
fn documents_split_only_at_marker_lines() {
    let text = "a: 1\n---\nb: |\n  --- not a marker\n---   \nc: 3\n--- {d: 4}\n----\n";
    let docs = documents::split(text);
    let starts: Vec<_> = docs.iter().map(|d| d.line_offset).collect();
    assert_eq!(starts, [0, 1, 4, 6]);
    assert_eq!(docs[3].text, "--- {d: 4}\n----\n");
    assert_eq!(documents::split("---\na: 1\n").len(), 1);
    assert_eq!(documents::split("").len(), 1);
}

#[test]
fn empty_documents_and_comments_are_fine() {
    let loaded = load("# just a comment\n---\n---\n").unwrap();
    assert!(loaded.policies.policies().is_empty());
}

#[test]
fn written_yaml_reads_back() {
    let text = format!(
        "{HEAD}spec:\n  target: spiffe://example.org/ns/a/**\n  mode: audit\n  onRevoke: drain:90s\n  rules:\n    - action: deny\n      from: [spiffe://example.org/ns/b/*]\n      ports: [1, \"2-3\"]\n      http: {{methods: [GET], paths: [/x/*/y, /z/**], hosts: [\"*.Shop.\", \"a:80\"]}}\n"
    );
    let loaded = load(&text).unwrap();
    let yaml = to_yaml(&loaded.policies);
    let again = load(&yaml).unwrap();
    assert_eq!(again.policies, loaded.policies, "{yaml}");
    assert!(yaml.contains("onRevoke: drain:90s"), "{yaml}");
}

#[test]
fn variables_table() {
    let lookup = |name: &str| match name {
        "POD_IP" => Some("10.0.0.7".to_owned()),
        "EMPTY" => Some(String::new()),
        "_X1" => Some("x".to_owned()),
        "BREAK" => Some("a\nb: c".to_owned()),
        _ => None,
    };
    let ok = [
        ("plain: text\n", "plain: text\n"),
        (
            "advertise: \"${POD_IP}:4643\"\n",
            "advertise: \"10.0.0.7:4643\"\n",
        ),
        ("a: ${POD_IP}${_X1}${EMPTY}\n", "a: 10.0.0.7x\n"),
        ("price: $$5 and $$${POD_IP}\n", "price: $5 and $10.0.0.7\n"),
        (
            "lone: $ and $x and $(POD_NAME) and a$\n",
            "lone: $ and $x and $(POD_NAME) and a$\n",
        ),
    ];
    for (text, expected) in ok {
        assert_eq!(
            expand_variables("f.yaml", text, lookup).unwrap(),
            expected,
            "{text:?}"
        );
    }
    let refused = [
        (
            "a: 1\nb: ${NOPE}\n",
            "f.yaml:2:4: environment variable NOPE is not set",
        ),
        ("a: ${POD_IP\n", "f.yaml:1:4: `${` without its closing `}`"),
        ("a: ${}\n", "f.yaml:1:4: ${} is not a variable name"),
        ("a: ${1X}\n", "f.yaml:1:4: ${1X} is not a variable name"),
        (
            "a: ${POD-IP}\n",
            "f.yaml:1:4: ${POD-IP} is not a variable name",
        ),
        (
            "x: y\n  z: ${BREAK}\n",
            "f.yaml:2:6: environment variable BREAK holds a line break",
        ),
    ];
    for (text, expected) in refused {
        let error = expand_variables("f.yaml", text, lookup)
            .unwrap_err()
            .to_string();
        assert!(error.starts_with(expected), "{text:?}: {error}");
    }
    assert!(matches!(
        expand_variables("f.yaml", "no dollars", lookup),
        Ok(std::borrow::Cow::Borrowed(_))
    ));
}

/// Review (issue 17): a repeated key was reported at the start of the enclosing mapping, or,
/// in a map field, silently kept its last value. Configuration files get the same walk.
#[test]
fn duplicate_keys_in_configuration_files_point_at_the_second_occurrence() {
    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)] // read only to be refused
    struct Config {
        limits: std::collections::BTreeMap<String, u32>,
        listen: String,
    }
    let text = "listen: a\nlimits:\n  x: 1\n  y: 2\n  x: 3\n";
    let error = config_from_yaml::<Config>("c.yaml", text).unwrap_err();
    assert_eq!(
        error.to_string(),
        "c.yaml:5:3: limits: duplicate key `x` (hint: each key may appear only once in a mapping)"
    );
    let error =
        config_from_yaml::<Config>("c.yaml", "listen: a\nlimits: {}\nlisten: b\n").unwrap_err();
    assert!(
        error
            .to_string()
            .starts_with("c.yaml:3:1: duplicate key `listen`"),
        "{error}"
    );
}
