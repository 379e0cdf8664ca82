//! Loading policy files: the only module that reads YAML.
//!
//! Files are `*.yaml`/`*.yml` found recursively under the given paths (a file named directly is
//! read whatever its extension). A file may hold several documents separated by `---`; each is
//! parsed strictly (unknown fields, duplicate keys, wrong types and invalid values are errors)
//! into validated types, so every error carries `file:line:column` and a hint. Loading is all
//! or nothing: any error means no policy set at all, and every error found is reported.
//!
//! serde_yaml is deprecated but final; it is confined to this module and [`documents`] so that
//! it can be swapped without touching the model.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::policy::{Policy, PolicySet};
use crate::testing::PolicyTest;

mod documents;
pub use documents::to_yaml;

/// Largest policy file read, in bytes. Default for [`LoadOptions::max_file_bytes`].
pub const DEFAULT_MAX_FILE_BYTES: u64 = 1024 * 1024;
/// Most rules across a policy set. Default for [`LoadOptions::max_rules`].
pub const DEFAULT_MAX_RULES: usize = 100_000;

/// Limits and choices for one load.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Files larger than this are refused. Default is 1 MiB.
    pub max_file_bytes: u64,
    /// Policy sets with more rules than this are refused. Default is 100,000.
    pub max_rules: usize,
    /// Whether `PolicyTest` documents are parsed (strictly) and returned, or skipped and
    /// counted like other kinds. Default is false.
    pub tests: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            max_file_bytes: DEFAULT_MAX_FILE_BYTES,
            max_rules: DEFAULT_MAX_RULES,
            tests: false,
        }
    }
}

/// One policy file's name (as it should appear in errors) and contents. Also the file as the
/// control plane stores it and as the operator API carries it (`wire::operator::PolicySet`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Source {
    /// The file name shown in errors.
    pub name: String,
    /// The file's text.
    pub text: String,
}

/// A successfully loaded policy set.
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    /// The policies, sorted by name.
    pub policies: PolicySet,
    /// `PolicyTest` documents, when [`LoadOptions::tests`] is set.
    pub tests: Vec<PolicyTest>,
    /// Documents of other Sidewall kinds that were skipped, by kind.
    pub skipped: BTreeMap<String, usize>,
    /// Number of files read.
    pub files: usize,
}

/// Where an error is: a file and, when known, a 1-based line and column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The file (as given, or as found under a directory).
    pub file: String,
    /// 1-based line and column, when the error has a position.
    pub position: Option<(usize, usize)>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            Some((line, column)) => write!(f, "{}:{line}:{column}", self.file),
            None => f.write_str(&self.file),
        }
    }
}

/// What went wrong while loading.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadErrorKind {
    /// The path does not exist.
    #[error("no such file or directory")]
    NotFound,
    /// The path could not be read.
    #[error("cannot read: {0}")]
    Io(String),
    /// A directory with no policy files under it.
    #[error("no *.yaml or *.yml files found")]
    NoFiles,
    /// The file is over the size cap.
    #[error("file is {size} bytes, over the {max}-byte limit")]
    TooLarge {
        /// Size seen.
        size: u64,
        /// The cap.
        max: u64,
    },
    /// The file is not UTF-8.
    #[error("file is not valid UTF-8")]
    NotUtf8,
    /// A YAML syntax error, or a value of the wrong shape, type or format.
    #[error("{0}")]
    Invalid(String),
    /// A policy name already used by another policy.
    #[error("policy name {name:?} is already used at {first}")]
    DuplicateName {
        /// The name.
        name: String,
        /// Where it was first defined.
        first: Location,
    },
    /// The set has more rules than allowed.
    #[error("the policy set has more than {max} rules")]
    TooManyRules {
        /// The cap.
        max: usize,
    },
    /// `spec.addresses` on a policy whose target is a pattern.
    #[error("spec.addresses needs an exact target, not the pattern {target}")]
    AddressesNeedExactTarget {
        /// The pattern.
        target: String,
    },
    /// An address declared for two different targets.
    #[error("address {address} is declared for {target} at {first}")]
    AddressDeclaredTwice {
        /// The address.
        address: std::net::SocketAddr,
        /// The other target.
        target: String,
        /// Where.
        first: Box<Location>,
    },
}

impl LoadErrorKind {
    /// A short, actionable hint for the error.
    pub fn hint(&self) -> &'static str {
        match self {
            Self::NotFound => "check the path",
            Self::Io(_) => "check the file's permissions",
            Self::NoFiles => "policy files must end in .yaml or .yml",
            Self::TooLarge { .. } => "split the policies over several files",
            Self::NotUtf8 => "save the file as UTF-8",
            Self::Invalid(message) => hint_for(message),
            Self::DuplicateName { .. } => "give each policy a unique metadata.name",
            Self::TooManyRules { .. } => {
                "merge rules (patterns, port ranges) or raise the rule cap"
            }
            Self::AddressesNeedExactTarget { .. } => {
                "an address belongs to one service: declare it in a policy whose target is that service's SPIFFE ID"
            }
            Self::AddressDeclaredTwice { .. } => {
                "an address belongs to one service: declare it for one target only"
            }
        }
    }
}

/// Hints for parser messages, by what the message says.
fn hint_for(message: &str) -> &'static str {
    let table: [(&str, &str); 18] = [
        (
            "invalid socket address",
            "addresses are IP:port, e.g. 10.96.0.10:8080 or \"[fd00::10]:8080\"",
        ),
        (
            "invalid path pattern",
            "paths start with '/'; '*' is one segment, a final '**' the rest",
        ),
        (
            "invalid host pattern",
            "hosts look like api.shop, *.shop or api.shop:8443",
        ),
        (
            "invalid HTTP method",
            "methods are uppercase tokens such as GET or POST",
        ),
        (
            "invalid policy name",
            "names use a-z A-Z 0-9 . _ - and start with a letter or digit",
        ),
        ("duration", "write e.g. 500ms, 30s, 5m, 1h or 7d"),
        (
            "from: empty list",
            "list at least one identity or pattern that may connect",
        ),
        (
            "unknown field",
            "check the spelling; the fields allowed here are listed",
        ),
        (
            "duplicate key",
            "each key may appear only once in a mapping",
        ),
        ("missing field", "add the required field"),
        ("unknown variant", "use one of the values listed"),
        (
            "invalid SPIFFE ID",
            "identities look like spiffe://example.org/ns/NS/svc/NAME",
        ),
        (
            "invalid identity pattern",
            "use an exact ID, or end it with /* or /**",
        ),
        (
            "invalid type",
            "check the value's type against docs/policy.md",
        ),
        ("apiVersion", "use apiVersion: sidewall.dev/v1"),
        ("kind", "use kind: Policy (or PolicyTest)"),
        ("empty list", "omit the field to mean 'any'"),
        ("port", "ports are 1-65535; ranges are \"LOW-HIGH\""),
    ];
    table
        .iter()
        .find(|(needle, _)| message.contains(needle))
        .map(|(_, hint)| *hint)
        .unwrap_or("see docs/policy.md")
}

/// One error, with its location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadError {
    /// Where.
    pub location: Location,
    /// What.
    pub kind: LoadErrorKind,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} (hint: {})",
            self.location,
            self.kind,
            self.kind.hint()
        )
    }
}

impl std::error::Error for LoadError {}

/// Every error found in one load, in file order. Displays one per line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadErrors(pub Vec<LoadError>);

impl fmt::Display for LoadErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for LoadErrors {}

fn error_at(file: &str, position: Option<(usize, usize)>, kind: LoadErrorKind) -> LoadError {
    LoadError {
        location: Location {
            file: file.to_owned(),
            position,
        },
        kind,
    }
}

/// Finds and reads the policy files under `paths`, then loads them as one set.
pub fn load_paths<P: AsRef<Path>>(
    paths: &[P],
    options: &LoadOptions,
) -> Result<Loaded, LoadErrors> {
    let (sources, mut errors) = collect_sources(paths, options);
    match load_sources(&sources, options) {
        Ok(loaded) if errors.is_empty() => Ok(loaded),
        Ok(_) => Err(LoadErrors(errors)),
        Err(LoadErrors(more)) => {
            errors.extend(more);
            Err(LoadErrors(errors))
        }
    }
}

/// Finds and reads the policy files under `paths` without parsing them (to send them to the
/// control plane as they are). Every file that cannot be found or read is an error.
pub fn read_sources<P: AsRef<Path>>(
    paths: &[P],
    options: &LoadOptions,
) -> Result<Vec<Source>, LoadErrors> {
    let (sources, errors) = collect_sources(paths, options);
    if errors.is_empty() {
        Ok(sources)
    } else {
        Err(LoadErrors(errors))
    }
}

/// The policy files under `path` as the loader finds them (sorted; hidden entries and links to
/// directories skipped), without reading them; at least one, or [`LoadErrorKind::NoFiles`].
pub fn discover_files(path: &Path) -> Result<Vec<PathBuf>, LoadErrors> {
    let mut files = Vec::new();
    discover(path, true, &mut files).map_err(|e| LoadErrors(vec![e]))?;
    if files.is_empty() {
        return Err(LoadErrors(vec![error_at(
            &path.display().to_string(),
            None,
            LoadErrorKind::NoFiles,
        )]));
    }
    Ok(files)
}

fn collect_sources<P: AsRef<Path>>(
    paths: &[P],
    options: &LoadOptions,
) -> (Vec<Source>, Vec<LoadError>) {
    let mut errors = Vec::new();
    let mut sources = Vec::new();
    for path in paths {
        let path = path.as_ref();
        let mut files = Vec::new();
        if let Err(error) = discover(path, true, &mut files) {
            errors.push(error);
            continue;
        }
        if files.is_empty() {
            errors.push(error_at(
                &path.display().to_string(),
                None,
                LoadErrorKind::NoFiles,
            ));
        }
        for file in files {
            match read_capped(&file, options.max_file_bytes) {
                Ok(text) => sources.push(Source {
                    name: file.display().to_string(),
                    text,
                }),
                Err(kind) => errors.push(error_at(&file.display().to_string(), None, kind)),
            }
        }
    }
    (sources, errors)
}

/// Collects policy files under `path`, sorted so loads are reproducible. Hidden entries and
/// symbolic links to directories are skipped while walking (links could loop).
fn discover(path: &Path, named: bool, files: &mut Vec<PathBuf>) -> Result<(), LoadError> {
    let io_error = |e: std::io::Error| {
        let kind = if e.kind() == std::io::ErrorKind::NotFound {
            LoadErrorKind::NotFound
        } else {
            LoadErrorKind::Io(e.to_string())
        };
        error_at(&path.display().to_string(), None, kind)
    };
    let metadata = if named {
        std::fs::metadata(path)
    } else {
        std::fs::symlink_metadata(path)
    }
    .map_err(io_error)?;
    if metadata.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(io_error)?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| {
                !p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            })
            .collect();
        entries.sort();
        for entry in entries {
            discover(&entry, false, files)?;
        }
    } else if named || is_policy_file(path, &metadata) {
        files.push(path.to_path_buf());
    }
    Ok(())
}

fn is_policy_file(path: &Path, metadata: &std::fs::Metadata) -> bool {
    let yaml = path
        .extension()
        .is_some_and(|ext| ext == "yaml" || ext == "yml");
    // A symbolic link to a file is followed; a link to a directory is not walked.
    yaml && (metadata.is_file()
        || (metadata.file_type().is_symlink() && path.metadata().is_ok_and(|m| m.is_file())))
}

/// Reads a file, refusing it if it is (or grows) over `max` bytes.
fn read_capped(path: &Path, max: u64) -> Result<String, LoadErrorKind> {
    let file = std::fs::File::open(path).map_err(|e| LoadErrorKind::Io(e.to_string()))?;
    let mut bytes = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| LoadErrorKind::Io(e.to_string()))?;
    let size = bytes.len() as u64;
    if size > max {
        let size = path.metadata().map(|m| m.len()).unwrap_or(size);
        return Err(LoadErrorKind::TooLarge { size, max });
    }
    String::from_utf8(bytes).map_err(|_| LoadErrorKind::NotUtf8)
}

/// Loads a policy set from file contents already in memory (the control plane receives
/// policy files this way). All or nothing.
pub fn load_sources(sources: &[Source], options: &LoadOptions) -> Result<Loaded, LoadErrors> {
    let mut errors = Vec::new();
    let mut policies: Vec<Policy> = Vec::new();
    let mut names: HashMap<String, Location> = HashMap::new();
    let mut declared: HashMap<std::net::SocketAddr, (String, Location)> = HashMap::new();
    let mut loaded = Loaded::default();
    let mut rules = 0usize;
    let mut over_cap = false;
    for source in sources {
        loaded.files += 1;
        if source.text.len() as u64 > options.max_file_bytes {
            errors.push(error_at(
                &source.name,
                None,
                LoadErrorKind::TooLarge {
                    size: source.text.len() as u64,
                    max: options.max_file_bytes,
                },
            ));
            continue;
        }
        for document in documents::split(&source.text) {
            let parsed = match documents::parse(document.text, options.tests) {
                Ok(parsed) => parsed,
                Err(error) => {
                    let position = error
                        .position
                        .map(|(line, column)| (line + document.line_offset, column));
                    errors.push(error_at(
                        &source.name,
                        position,
                        LoadErrorKind::Invalid(error.message),
                    ));
                    continue;
                }
            };
            match parsed {
                documents::Parsed::Empty => {}
                documents::Parsed::Skipped(kind) => {
                    *loaded.skipped.entry(kind.to_owned()).or_default() += 1;
                }
                documents::Parsed::Test(mut test) => {
                    test.file = source.name.clone();
                    loaded.tests.push(test);
                }
                documents::Parsed::Policy(policy) => {
                    let here = || Location {
                        file: source.name.clone(),
                        position: documents::name_position(document.text)
                            .map(|(line, column)| (line + document.line_offset, column)),
                    };
                    let name = policy.name.to_string();
                    if let Some(first) = names.get(&name) {
                        let location = here();
                        errors.push(LoadError {
                            location,
                            kind: LoadErrorKind::DuplicateName {
                                name,
                                first: first.clone(),
                            },
                        });
                        continue;
                    }
                    rules += policy.rules.len();
                    if rules > options.max_rules && !over_cap {
                        over_cap = true;
                        errors.push(LoadError {
                            location: here(),
                            kind: LoadErrorKind::TooManyRules {
                                max: options.max_rules,
                            },
                        });
                    }
                    if !policy.addresses.is_empty() && policy.target.exact().is_none() {
                        errors.push(LoadError {
                            location: here(),
                            kind: LoadErrorKind::AddressesNeedExactTarget {
                                target: policy.target.to_string(),
                            },
                        });
                    }
                    for address in &policy.addresses {
                        match declared.get(address) {
                            Some((target, first)) if *target != policy.target.as_str() => {
                                errors.push(LoadError {
                                    location: here(),
                                    kind: LoadErrorKind::AddressDeclaredTwice {
                                        address: *address,
                                        target: target.clone(),
                                        first: Box::new(first.clone()),
                                    },
                                });
                            }
                            Some(_) => {}
                            None => {
                                declared
                                    .insert(*address, (policy.target.as_str().to_owned(), here()));
                            }
                        }
                    }
                    names.insert(name, here());
                    policies.push(policy);
                }
            }
        }
    }
    if !errors.is_empty() {
        return Err(LoadErrors(errors));
    }
    // Names were checked above with their locations; this cannot fail, but map it anyway.
    loaded.policies = PolicySet::new(policies).map_err(|e| {
        LoadErrors(vec![error_at(
            "<policy set>",
            None,
            LoadErrorKind::Invalid(e.to_string()),
        )])
    })?;
    Ok(loaded)
}

/// Parses one YAML configuration file strictly into `T` (which should refuse unknown fields),
/// with the same `file:line:column: message (hint: ...)` errors as policy files. The sidecar
/// and control-plane configurations are read this way, so serde_yaml stays in this module.
pub fn config_from_yaml<T: serde::de::DeserializeOwned>(
    name: &str,
    text: &str,
) -> Result<T, LoadError> {
    if text.len() as u64 > DEFAULT_MAX_FILE_BYTES {
        return Err(error_at(
            name,
            None,
            LoadErrorKind::TooLarge {
                size: text.len() as u64,
                max: DEFAULT_MAX_FILE_BYTES,
            },
        ));
    }
    documents::parse_config(text)
        .map_err(|e| error_at(name, e.position, LoadErrorKind::Invalid(e.message)))
}

/// Replaces `${NAME}` in a configuration file's text with the value `lookup` gives for `NAME`
/// (the process environment, for the sidecar's and the control plane's files), so a
/// Kubernetes manifest needs no shell wrapper: `advertise: "${POD_IP}:4643"`. `$$` is a literal
/// `$`; a `$` before anything else stays as it is. A variable `lookup` does not know, a name
/// that is not `[A-Za-z_][A-Za-z0-9_]*`, an unclosed `${`, or a value holding a line break (it
/// could add YAML structure) is an error at that `$`'s line and column. Errors the YAML parser
/// finds afterwards point at the expanded text.
pub fn expand_variables<'a>(
    name: &str,
    text: &'a str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<std::borrow::Cow<'a, str>, LoadError> {
    if !text.contains('$') {
        return Ok(std::borrow::Cow::Borrowed(text));
    }
    let position = |at: usize| {
        let before = &text[..at];
        let line = before.matches('\n').count() + 1;
        let column = before.rfind('\n').map_or(at, |nl| at - nl - 1) + 1;
        Some((line, column))
    };
    let refuse =
        |at: usize, message: String| error_at(name, position(at), LoadErrorKind::Invalid(message));
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(dollar) = rest.find('$') {
        let at = text.len() - rest.len() + dollar;
        out.push_str(&rest[..dollar]);
        let after = &rest[dollar + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('{') {
            let end = inner
                .find('}')
                .ok_or_else(|| refuse(at, "`${` without its closing `}`".into()))?;
            let variable = &inner[..end];
            let valid = variable
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
                && variable
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !valid {
                return Err(refuse(
                    at,
                    format!(
                        "${{{variable}}} is not a variable name (letters, digits, _; write $$ for a literal $)"
                    ),
                ));
            }
            let value = lookup(variable)
                .ok_or_else(|| refuse(at, format!("environment variable {variable} is not set")))?;
            if value.contains(['\n', '\r']) {
                return Err(refuse(
                    at,
                    format!("environment variable {variable} holds a line break"),
                ));
            }
            out.push_str(&value);
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(std::borrow::Cow::Owned(out))
}

/// Loads one file's text (a convenience for tests and tools).
pub fn load_str(name: &str, text: &str, options: &LoadOptions) -> Result<Loaded, LoadErrors> {
    load_sources(
        &[Source {
            name: name.to_owned(),
            text: text.to_owned(),
        }],
        options,
    )
}

#[cfg(test)]
mod tests;
