//! `--config FILE`: a command's settings in a TOML file. Each top-level
//! `key = value` is the flag `--key value` (`max_frame` or `max-frame` for
//! `--max-frame`), put on the command line before the user's own flags,
//! which therefore win (every flag overrides an earlier one of its kind).
//! So the file holds every setting that flags hold, the service's own
//! options included, and nothing else:
//!
//! ```toml
//! port = 7100
//! workers = 4
//! dir = "/run/handoff"
//! policy = "least-conn"
//! rebalance = true          # a switch: true gives --rebalance, false nothing
//! max_frame = 65536         # the rpc service's --max-frame
//! log_level = "info"
//! peers = ["B=10.0.0.2:7201", "C=10.0.0.3:7202"]   # node: a list is joined with commas
//! ```
//!
//! A key that is no flag of that command, a table, or a value of the
//! wrong kind is an error naming the file, the line and the key.
use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

use clap::{ArgAction, Command};

/// The subcommands that take `--config`.
pub(crate) const CONFIGURABLE: [&str; 4] = ["cluster", "node", "server", "pair"];

/// One `key = value` of the file, as flags.
pub(crate) struct Setting {
    /// The flag's long name (`max-frame`).
    pub(crate) long: String,
    /// The key as written.
    pub(crate) key: String,
    /// 1-based.
    pub(crate) line: usize,
    /// The value as the file has it (for messages).
    pub(crate) shown: String,
}

/// A config file, read and turned into flags.
pub(crate) struct Loaded {
    pub(crate) path: PathBuf,
    pub(crate) settings: Vec<Setting>,
}

impl Loaded {
    /// A note for a command-line error about a flag whose value came from
    /// this file (and not from the command line itself): `None` otherwise.
    pub(crate) fn note_for(&self, e: &clap::Error, user_args: &[OsString]) -> Option<String> {
        let arg = match e.get(clap::error::ContextKind::InvalidArg) {
            Some(clap::error::ContextValue::String(s)) => s.clone(),
            _ => return None,
        };
        let long = arg.strip_prefix("--")?.split([' ', '=']).next()?.to_string();
        let given = user_args.iter().any(|a| {
            let a = a.to_string_lossy();
            a == format!("--{long}") || a.starts_with(&format!("--{long}="))
        });
        if given {
            return None;
        }
        let s = self.settings.iter().find(|s| s.long == long)?;
        Some(format!("(from {}, line {}: {} = {})", self.path.display(), s.line, s.key, s.shown))
    }
}

/// Where argv names a configurable subcommand and a `--config FILE`
/// after it: (index of the subcommand, the file).
fn locate(argv: &[OsString]) -> Option<(usize, PathBuf)> {
    let mut i = 1;
    // Global flags may come before the subcommand.
    while i < argv.len() {
        let a = argv[i].to_string_lossy();
        if a == "--log-level" {
            i += 2;
        } else if a.starts_with('-') && (a.starts_with("--log-level=") || a == "--verbose" || is_short_v(&a)) {
            i += 1;
        } else {
            break;
        }
    }
    let sub = i;
    if !CONFIGURABLE.contains(&argv.get(sub)?.to_str()?) {
        return None;
    }
    let mut file = None;
    let mut j = sub + 1;
    while j < argv.len() {
        let a = &argv[j];
        if a == "--" {
            break;
        }
        if a == "--config" {
            file = argv.get(j + 1).map(PathBuf::from);
            j += 1;
        } else if let Some(f) = a.to_str().and_then(|s| s.strip_prefix("--config=")) {
            file = Some(PathBuf::from(f));
        }
        j += 1;
    }
    Some((sub, file?))
}

fn is_short_v(a: &str) -> bool {
    a.len() > 1 && a[1..].chars().all(|c| c == 'v')
}

/// Puts the settings of the `--config FILE` that argv gives its
/// subcommand on the command line, right after the subcommand (before the
/// user's flags, which override them). Without `--config`, argv is
/// returned as it is.
pub(crate) fn expand(cmd: &Command, argv: Vec<OsString>) -> Result<(Vec<OsString>, Option<Loaded>), String> {
    let Some((sub, path)) = locate(&argv) else { return Ok((argv, None)) };
    let name = argv[sub].to_string_lossy().into_owned();
    let Some(subcmd) = cmd.find_subcommand(&name) else { return Ok((argv, None)) };
    let (flags, loaded) = load(&path, cmd, subcmd)?;
    let mut out: Vec<OsString> = argv[..=sub].to_vec();
    out.extend(flags);
    out.extend_from_slice(&argv[sub + 1..]);
    Ok((out, Some(loaded)))
}

/// Reads `path` and turns it into flags of `sub` (and the global ones of
/// `root`).
fn load(path: &Path, root: &Command, sub: &Command) -> Result<(Vec<OsString>, Loaded), String> {
    let file = path.display();
    let text = std::fs::read_to_string(path).map_err(|e| format!("config {file}: {e}"))?;
    let table: BTreeMap<toml::Spanned<String>, toml::Spanned<toml::Value>> = toml::from_str(&text).map_err(|e| {
        let at = e.span().map(|s| position(&text, s.start));
        let msg = e.message().trim().replace('\n', "; ");
        match at {
            Some((line, col)) => format!("config {file}: bad TOML at line {line}, column {col}: {msg}"),
            None => format!("config {file}: bad TOML: {msg}"),
        }
    })?;
    let mut entries: Vec<_> = table.into_iter().collect();
    entries.sort_by_key(|(k, _)| k.span().start);
    let args: Vec<&clap::Arg> = sub
        .get_arguments()
        .chain(root.get_arguments().filter(|a| a.is_global_set()))
        .filter(|a| a.get_long().is_some_and(|l| !matches!(l, "config" | "help" | "version")))
        .collect();
    let mut flags = Vec::new();
    let mut settings = Vec::new();
    for (key, value) in entries {
        let line = position(&text, key.span().start).0;
        let key = key.into_inner();
        let at = format!("config {file}, line {line}");
        let long = key.replace('_', "-");
        if let toml::Value::Table(_) = value.get_ref() {
            return Err(format!(
                "{at}: [{key}] is a table; settings are top-level `key = value` lines (flags of `{}`)",
                sub.get_name()
            ));
        }
        if long == "config" {
            return Err(format!("{at}: `{key}` cannot be set in a config file (no nesting)"));
        }
        let Some(arg) = args.iter().find(|a| a.get_long() == Some(long.as_str())) else {
            let known: Vec<String> = args.iter().filter_map(|a| a.get_long()).map(|l| l.replace('-', "_")).collect();
            return Err(format!(
                "{at}: unknown setting `{key}` for `{}` (known: {})",
                sub.get_name(),
                known.join(", ")
            ));
        };
        let shown = text.get(value.span()).unwrap_or("").trim().to_string();
        let value = value.into_inner();
        let flag = format!("--{long}");
        match (arg.get_action(), &value) {
            (ArgAction::SetTrue, toml::Value::Boolean(b)) => {
                if *b {
                    flags.push(flag.into());
                }
            }
            (ArgAction::SetTrue, _) => {
                return Err(format!("{at}: `{key}` is a switch: give true or false, not {shown}"));
            }
            (ArgAction::Count, toml::Value::Boolean(b)) => flags.extend((0..u8::from(*b)).map(|_| flag.clone().into())),
            (ArgAction::Count, toml::Value::Integer(n)) if (0..=8).contains(n) => {
                flags.extend((0..*n).map(|_| flag.clone().into()))
            }
            (ArgAction::Count, _) => return Err(format!("{at}: `{key}` is a count: give 0 to 8, not {shown}")),
            (ArgAction::Append, toml::Value::Array(items)) => {
                for item in items {
                    flags.push(with_value(&flag, &scalar(item).map_err(|why| format!("{at}: `{key}`: {why}"))?));
                }
            }
            (_, toml::Value::Array(items)) => {
                let parts: Result<Vec<String>, String> = items.iter().map(scalar).collect();
                let joined = parts.map_err(|why| format!("{at}: `{key}`: {why}"))?.join(",");
                flags.push(with_value(&flag, &joined));
            }
            (_, v) => flags.push(with_value(&flag, &scalar(v).map_err(|why| format!("{at}: `{key}`: {why}"))?)),
        }
        settings.push(Setting { long, key, line, shown });
    }
    Ok((flags, Loaded { path: path.to_path_buf(), settings }))
}

/// `--flag=value`: one word, so that a value starting with `-` stays a
/// value.
fn with_value(flag: &str, value: &str) -> OsString {
    let mut s = OsString::from(flag);
    s.push("=");
    s.push(OsStr::new(value));
    s
}

/// A value as a flag's text.
fn scalar(v: &toml::Value) -> Result<String, String> {
    Ok(match v {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(n) => n.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        toml::Value::Datetime(d) => d.to_string(),
        toml::Value::Array(_) => return Err("a list inside a list is not a flag's value".into()),
        toml::Value::Table(_) => return Err("a table is not a flag's value".into()),
    })
}

/// 1-based (line, column) of byte offset `at` in `text`.
fn position(text: &str, at: usize) -> (usize, usize) {
    let before = &text[..at.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, Command};

    fn cmd() -> Command {
        Command::new("bin")
            .arg(Arg::new("log-level").long("log-level").global(true))
            .arg(Arg::new("verbose").long("verbose").short('v').action(ArgAction::Count).global(true))
            .subcommand(
                Command::new("cluster")
                    .arg(Arg::new("port").long("port"))
                    .arg(Arg::new("max-frame").long("max-frame"))
                    .arg(Arg::new("rebalance").long("rebalance").action(ArgAction::SetTrue))
                    .arg(Arg::new("peers").long("peers"))
                    .arg(Arg::new("tag").long("tag").action(ArgAction::Append))
                    .arg(Arg::new("config").long("config")),
            )
            .subcommand(Command::new("status").arg(Arg::new("config").long("config")))
    }

    fn file(name: &str, text: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("handoff-config-{}-{name}.toml", std::process::id()));
        std::fs::write(&p, text).unwrap();
        p
    }

    fn args(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    fn strs(v: &[OsString]) -> Vec<String> {
        v.iter().map(|a| a.to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn settings_become_flags_before_the_users() {
        let p = file(
            "ok",
            "port = 7100\nmax_frame = 4096\nrebalance = true\npeers = [\"B=h:1\", \"C=h:2\"]\n\
             tag = [\"a\", \"b\"]\nlog-level = \"debug\"\nverbose = 2\n",
        );
        let argv = args(&["bin", "-v", "cluster", "--config", p.to_str().unwrap(), "--port", "1"]);
        let (out, loaded) = expand(&cmd(), argv).unwrap();
        assert_eq!(
            strs(&out),
            [
                "bin",
                "-v",
                "cluster",
                "--port=7100",
                "--max-frame=4096",
                "--rebalance",
                "--peers=B=h:1,C=h:2",
                "--tag=a",
                "--tag=b",
                "--log-level=debug",
                "--verbose",
                "--verbose",
                "--config",
                p.to_str().unwrap(),
                "--port",
                "1"
            ]
        );
        let loaded = loaded.unwrap();
        assert_eq!(loaded.settings[1].key, "max_frame");
        assert_eq!(loaded.settings[1].line, 2);
        let _ = std::fs::remove_file(p);
    }

    #[test]
    fn false_is_no_flag_and_no_config_is_no_change() {
        let p = file("false", "rebalance = false\n");
        let argv = args(&["bin", "cluster", &format!("--config={}", p.display())]);
        let (out, _) = expand(&cmd(), argv.clone()).unwrap();
        assert_eq!(out, argv);
        let plain = args(&["bin", "cluster", "--port", "1"]);
        assert_eq!(expand(&cmd(), plain.clone()).unwrap().0, plain);
        // Not a configurable subcommand: left to clap.
        let other = args(&["bin", "status", "--config", p.to_str().unwrap()]);
        assert_eq!(expand(&cmd(), other.clone()).unwrap().0, other);
        let _ = std::fs::remove_file(p);
    }

    #[test]
    fn errors_name_the_file_line_and_key() {
        let err = |name: &str, text: &str| {
            let p = file(name, text);
            let e = expand(&cmd(), args(&["bin", "cluster", "--config", p.to_str().unwrap()])).err().unwrap();
            let _ = std::fs::remove_file(&p);
            assert!(e.contains(&p.display().to_string()), "{e}");
            e
        };
        let e = err("unknown", "port = 1\n\nworkerz = 3\n");
        assert!(e.contains("line 3: unknown setting `workerz` for `cluster`"), "{e}");
        assert!(e.contains("max_frame"), "lists the known settings: {e}");
        let e = err("toml", "port = 1\nworkers = \n");
        assert!(e.contains("bad TOML at line 2, column"), "{e}");
        let e = err("table", "[cluster]\nport = 1\n");
        assert!(e.contains("line 1: [cluster] is a table"), "{e}");
        let e = err("switch", "rebalance = 1\n");
        assert!(e.contains("`rebalance` is a switch"), "{e}");
        let e = err("nested", "config = \"x\"\n");
        assert!(e.contains("cannot be set in a config file"), "{e}");
        let e = expand(&cmd(), args(&["bin", "cluster", "--config", "/nonexistent/x.toml"])).err().unwrap();
        assert!(e.starts_with("config /nonexistent/x.toml: "), "{e}");
    }

    #[test]
    fn positions() {
        assert_eq!(position("ab\ncd", 0), (1, 1));
        assert_eq!(position("ab\ncd", 4), (2, 2));
    }
}
