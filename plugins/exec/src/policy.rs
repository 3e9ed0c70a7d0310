//! What a command line may run: the allowlist.
//!
//! The first word of the line names an allowlisted entry; the entry's fixed argv is the
//! program and its first arguments; further words are appended as separate arguments only if
//! the entry allows it. Words are split on ASCII whitespace and nothing else: there is no shell,
//! no quoting, no expansion. `;`, `|`, `&&`, `$()`, backticks, redirections and globs are
//! ordinary bytes inside one argument.
//!
//! An entry may also name the client identities allowed to run it (`identities`, from verified
//! TLS client certificates, [`wharf_core::Context::identity`]). Anyone else, a client without an
//! identity included, is answered exactly as for a word that is not in the allowlist, so a
//! client learns nothing about what others may run; the log says why.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// One allowlisted command, resolved at startup.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Absolute path of the program.
    pub program: PathBuf,
    /// Fixed arguments after the program.
    pub fixed_args: Vec<String>,
    /// Whether the client may append arguments.
    pub allow_args: bool,
    /// Wall-clock limit for this command.
    pub timeout: Duration,
    /// Output kept for this command.
    pub max_output: usize,
    /// The client identities that may run it; `None`: any client of the service.
    pub identities: Option<Vec<String>>,
}

impl Entry {
    /// Whether a client with `identity` (`None`: it has none) may run this entry.
    pub fn permits(&self, identity: Option<&str>) -> bool {
        match (&self.identities, identity) {
            (None, _) => true,
            (Some(allowed), Some(identity)) => allowed.iter().any(|a| a == identity),
            (Some(_), None) => false,
        }
    }
}

/// Why a command line was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The result the client sees.
    pub text: String,
    /// The entry exists but the client's identity may not run it (the text does not say so).
    pub by_identity: bool,
}

impl Refusal {
    fn new(text: impl Into<String>) -> Self {
        Refusal {
            text: text.into(),
            by_identity: false,
        }
    }
}

/// A command line checked against the allowlist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Approved<'a> {
    /// The allowlist key.
    pub name: &'a str,
    /// Arguments the client appended.
    pub extra_args: Vec<&'a str>,
}

/// Checks `line` against `allowlist`, for a client with `identity` (`None`: it has none).
pub fn check<'a>(
    allowlist: &'a BTreeMap<String, Entry>,
    line: &'a str,
    identity: Option<&str>,
) -> Result<Approved<'a>, Refusal> {
    if line
        .bytes()
        .any(|b| b == 0 || (b.is_ascii_control() && !b.is_ascii_whitespace()))
    {
        return Err(Refusal::new("command contains control characters"));
    }
    let mut words = line.split_ascii_whitespace();
    let Some(word) = words.next() else {
        return Err(Refusal::new("empty command"));
    };
    let not_allowed = || format!("command not allowed: {}", printable(word, 64));
    let Some((name, entry)) = allowlist.get_key_value(word) else {
        return Err(Refusal::new(not_allowed()));
    };
    if !entry.permits(identity) {
        return Err(Refusal {
            text: not_allowed(),
            by_identity: true,
        });
    }
    let extra_args: Vec<&str> = words.collect();
    if !extra_args.is_empty() && !entry.allow_args {
        return Err(Refusal::new(format!(
            "command does not take arguments: {name}"
        )));
    }
    Ok(Approved { name, extra_args })
}

/// A rendering of client input for messages and logs: at most `max` characters, then `...`.
/// (Logs escape control characters themselves: they print it with `{:?}`.)
pub fn printable(text: &str, max: usize) -> String {
    let mut s: String = text.chars().take(max).collect();
    if text.chars().count() > max {
        s.push_str("...");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowlist() -> BTreeMap<String, Entry> {
        let entry = |allow_args, identities: Option<&[&str]>| Entry {
            program: "/bin/ls".into(),
            fixed_args: vec![],
            allow_args,
            timeout: Duration::from_secs(1),
            max_output: 100,
            identities: identities.map(|ids| ids.iter().map(|id| id.to_string()).collect()),
        };
        [
            ("ls".to_string(), entry(true, None)),
            ("date".to_string(), entry(false, None)),
            ("reboot".to_string(), entry(false, Some(&["ops", "admin"]))),
        ]
        .into()
    }

    #[test]
    fn words_split_on_whitespace_only() {
        let list = allowlist();
        let ok = check(&list, "ls -l  /tmp;touch\tX", None).unwrap();
        assert_eq!(ok.name, "ls");
        assert_eq!(ok.extra_args, ["-l", "/tmp;touch", "X"]);
        let ok = check(&list, "ls $(touch X) `id` | tee X && rm", None).unwrap();
        assert_eq!(
            ok.extra_args,
            ["$(touch", "X)", "`id`", "|", "tee", "X", "&&", "rm"]
        );
    }

    #[test]
    fn refusals() {
        let list = allowlist();
        let refused = |line| check(&list, line, None).unwrap_err().text;
        assert_eq!(refused("rm -rf /"), "command not allowed: rm");
        assert_eq!(
            refused("date -s 2020"),
            "command does not take arguments: date"
        );
        assert_eq!(refused("ls;touch X"), "command not allowed: ls;touch");
        assert_eq!(refused("   "), "empty command");
        assert!(check(&list, "ls \0x", None).is_err());
        assert!(check(&list, "ls \x1b[2J", None).is_err());
        assert_eq!(check(&list, "date", None).unwrap().extra_args.len(), 0);
    }

    #[test]
    fn identities_restrict_an_entry_and_refusals_do_not_reveal_it() {
        let list = allowlist();
        for identity in ["ops", "admin"] {
            assert_eq!(
                check(&list, "reboot", Some(identity)).unwrap().name,
                "reboot"
            );
        }
        for identity in [Some("dev"), Some("Ops"), Some("ops "), Some(""), None] {
            let refusal = check(&list, "reboot", identity).unwrap_err();
            assert!(refusal.by_identity, "{identity:?}");
            // The same answer as for a word that is not in the allowlist.
            assert_eq!(refusal.text, "command not allowed: reboot");
            assert!(!check(&list, "rm", identity).unwrap_err().by_identity);
        }
        // Entries without `identities` are for every client, with an identity or not.
        assert!(check(&list, "date", Some("dev")).is_ok());
        assert!(check(&list, "date", None).is_ok());
    }
}
