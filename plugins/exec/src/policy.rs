//! What a command line may run: the allowlist.
//!
//! The first word of the line names an allowlisted entry; the entry's fixed argv is the
//! program and its first arguments; further words are appended as separate arguments only if
//! the entry allows it. Words are split on ASCII whitespace and nothing else: there is no shell,
//! no quoting, no expansion. `;`, `|`, `&&`, `$()`, backticks, redirections and globs are
//! ordinary bytes inside one argument.

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
}

/// Why a command line was refused; the text becomes the result the client sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal(pub String);

/// A command line checked against the allowlist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Approved<'a> {
    /// The allowlist key.
    pub name: &'a str,
    /// Arguments the client appended.
    pub extra_args: Vec<&'a str>,
}

/// Checks `line` against `allowlist`.
pub fn check<'a>(
    allowlist: &'a BTreeMap<String, Entry>,
    line: &'a str,
) -> Result<Approved<'a>, Refusal> {
    if line
        .bytes()
        .any(|b| b == 0 || (b.is_ascii_control() && !b.is_ascii_whitespace()))
    {
        return Err(Refusal("command contains control characters".into()));
    }
    let mut words = line.split_ascii_whitespace();
    let Some(word) = words.next() else {
        return Err(Refusal("empty command".into()));
    };
    let Some((name, entry)) = allowlist.get_key_value(word) else {
        return Err(Refusal(format!("command not allowed: {}", printable(word))));
    };
    let extra_args: Vec<&str> = words.collect();
    if !extra_args.is_empty() && !entry.allow_args {
        return Err(Refusal(format!("command does not take arguments: {name}")));
    }
    Ok(Approved { name, extra_args })
}

/// A bounded, printable rendering of client input for messages and logs.
fn printable(word: &str) -> String {
    let mut s: String = word.chars().take(64).collect();
    if word.chars().count() > 64 {
        s.push_str("...");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowlist() -> BTreeMap<String, Entry> {
        let entry = |allow_args| Entry {
            program: "/bin/ls".into(),
            fixed_args: vec![],
            allow_args,
            timeout: Duration::from_secs(1),
            max_output: 100,
        };
        [
            ("ls".to_string(), entry(true)),
            ("date".to_string(), entry(false)),
        ]
        .into()
    }

    #[test]
    fn words_split_on_whitespace_only() {
        let list = allowlist();
        let ok = check(&list, "ls -l  /tmp;touch\tX").unwrap();
        assert_eq!(ok.name, "ls");
        assert_eq!(ok.extra_args, ["-l", "/tmp;touch", "X"]);
        let ok = check(&list, "ls $(touch X) `id` | tee X && rm").unwrap();
        assert_eq!(
            ok.extra_args,
            ["$(touch", "X)", "`id`", "|", "tee", "X", "&&", "rm"]
        );
    }

    #[test]
    fn refusals() {
        let list = allowlist();
        assert_eq!(
            check(&list, "rm -rf /").unwrap_err().0,
            "command not allowed: rm"
        );
        assert_eq!(
            check(&list, "date -s 2020").unwrap_err().0,
            "command does not take arguments: date"
        );
        assert_eq!(
            check(&list, "ls;touch X").unwrap_err().0,
            "command not allowed: ls;touch"
        );
        assert_eq!(check(&list, "   ").unwrap_err().0, "empty command");
        assert!(check(&list, "ls \0x").is_err());
        assert!(check(&list, "ls \x1b[2J").is_err());
        assert_eq!(check(&list, "date").unwrap().extra_args.len(), 0);
    }
}
