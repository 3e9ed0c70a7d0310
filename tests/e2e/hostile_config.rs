//! Hostile and careless configuration (issue 14, items 6, 7, 8, 12 and the BOM of 14): the real
//! `wharf check` and `wharf serve` never print a secret, never drop an environment override
//! silently, never crash (one line, exit 2, whatever the input), and load in linear time.

use std::process::{Command, Output};
use std::time::Instant;

use crate::harness::*;

/// A token no other text in the output could contain.
const SECRET: &str = "s3cret-9f41c7d2";

/// `wharf <args>` with extra environment variables.
fn wharf_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(WHARF);
    cmd.args(args);
    // Only the test's overrides (not WHARF_SOAK_SECS or a developer's settings).
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("WHARF_") {
            cmd.env_remove(key);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Exit 2, and every line of stderr a `wharf:` line (no panic, no multi-line excerpt).
fn assert_config_error(o: &Output, needle: &str) -> String {
    let (out, err) = text(o);
    assert_eq!(o.status.code(), Some(2), "stdout:\n{out}\nstderr:\n{err}");
    assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
    for line in err.lines() {
        assert!(
            line.starts_with("wharf: "),
            "not a one-line error: {line:?} in\n{err}"
        );
        assert!(line.len() < 500, "a huge line: {}...", &line[..200]);
    }
    err
}

/// An exec service guarded by `token_line`.
fn exec_config(token_line: &str) -> String {
    format!(
        "[services.exec]\nplugin = \"exec\"\nlisten = \"127.0.0.1:0\"\n\
         [services.exec.options]\n{token_line}\n\
         [services.exec.options.commands]\necho = {{ argv = [\"/bin/echo\"] }}\n"
    )
}

#[test]
fn check_and_config_errors_never_show_a_secret() {
    let dir = TempDir::new();
    // `wharf check` runs in the systemd unit's ExecStartPre/ExecReload: its output is journaled.
    let path = dir.write("ok.toml", &exec_config(&format!("token = \"{SECRET}\"")));
    let out = wharf_env(&["check", "--config", path.to_str().unwrap()], &[]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("token = \"<redacted>\""), "{stdout}");
    assert!(
        !stdout.contains(SECRET) && !stderr.contains(SECRET),
        "{stdout}{stderr}"
    );

    // The same secret set by the environment.
    let out = wharf_env(
        &["check", "--config", path.to_str().unwrap()],
        &[("WHARF_SERVICES__EXEC__OPTIONS__TOKEN", "other-s3cret-77")],
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(!stdout.contains("other-s3cret-77"), "{stdout}");

    // Errors on the token key: a value of the wrong type (figment quotes it), from the file and
    // from the environment, and a syntax error on its line (the TOML excerpt shows the line).
    let numeric = "4815162342";
    let cases = [
        (exec_config(&format!("token = {numeric}")), vec![], numeric),
        (
            exec_config(""),
            vec![("WHARF_SERVICES__EXEC__OPTIONS__TOKEN", numeric)],
            numeric,
        ),
        (exec_config(&format!("token = \"{SECRET}")), vec![], SECRET),
    ];
    for (i, (config, env, secret)) in cases.into_iter().enumerate() {
        let path = dir.write(&format!("bad{i}.toml"), &config);
        for command in ["check", "serve"] {
            let out = wharf_env(&[command, "--config", path.to_str().unwrap()], &env);
            let err = assert_config_error(&out, "configuration error");
            assert!(
                !err.contains(secret),
                "case {i}: {command} shows the secret:\n{err}"
            );
        }
    }
}

#[test]
fn an_override_that_names_no_key_is_an_error_naming_it() {
    let dir = TempDir::new();
    let path = dir.write(
        "w.toml",
        "[services.e]\nplugin = \"echo\"\nlisten = \"127.0.0.1:0\"\n",
    );
    let path = path.to_str().unwrap();
    // Each of these used to vanish, leaving the service open to everyone.
    for var in [
        "WHARF_SERVICES__E____ALLOW_FROM",
        "WHARF___SERVICES__E__ALLOW_FROM",
        "WHARF_SERVICES__E__ALLOW_FROM__",
    ] {
        for command in ["check", "serve"] {
            let out = wharf_env(&[command, "--config", path], &[(var, "[\"10.0.0.0/8\"]")]);
            let err = assert_config_error(&out, &format!("environment variable {var}: "));
            assert!(!err.contains("listening"), "{err}");
        }
    }
    // A misspelt key is an error too, naming the variable; a correct one is applied.
    let out = wharf_env(
        &["check", "--config", path],
        &[("WHARF_SERVICES__E__ALOW_FROM", "[\"10.0.0.0/8\"]")],
    );
    assert_config_error(
        &out,
        "environment variable WHARF_SERVICES__E__ALOW_FROM: services.e",
    );
    let out = wharf_env(
        &["check", "--config", path],
        &[("WHARF_SERVICES__E__ALLOW_FROM", "[\"10.0.0.0/8\"]")],
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("allow_from = 10.0.0.0/8"), "{stdout}");
}

#[test]
fn deep_nesting_and_byte_order_marks_are_one_line_errors() {
    let dir = TempDir::new();
    let echo = "[services.e]\nplugin = \"echo\"\nlisten = \"127.0.0.1:0\"\n";
    let ok = dir.write("ok.toml", echo);
    let ok = ok.to_str().unwrap();
    let deep = format!("{}{}", "[".repeat(20_000), "]".repeat(20_000));
    // In an environment override: used to overflow the stack (SIGABRT, exit 134).
    for command in ["check", "serve"] {
        let out = wharf_env(
            &[command, "--config", ok],
            &[("WHARF_SERVICES__E__ALLOW_FROM", &deep)],
        );
        assert_config_error(
            &out,
            "environment variable WHARF_SERVICES__E__ALLOW_FROM: services.e.allow_from: \
             the value is nested 20000 levels deep; at most 32",
        );
    }
    // In the file: dotted keys and headers nest without brackets.
    let dotted = vec!["a"; 20_000].join(".");
    for (i, text) in [
        format!("{echo}x = {deep}\n"),
        format!("{echo}[{dotted}]\n"),
        format!("{echo}{dotted} = 1\n"),
    ]
    .iter()
    .enumerate()
    {
        let path = dir.write(&format!("deep{i}.toml"), text);
        let path = path.to_str().unwrap();
        let out = wharf_env(&["check", "--config", path], &[]);
        assert_config_error(&out, &format!("{path}: tables and arrays nested"));
    }
    // A UTF-8 byte-order mark: an error naming the file, not silently accepted.
    let path = dir.write("bom.toml", &format!("\u{feff}{echo}"));
    let path = path.to_str().unwrap();
    let out = wharf_env(&["check", "--config", path], &[]);
    assert_config_error(
        &out,
        &format!("{path}: the file starts with a UTF-8 byte-order mark"),
    );
}

#[test]
fn config_load_time_grows_linearly_with_services() {
    let dir = TempDir::new();
    let config = |n: usize| {
        let mut text = String::from("[server]\nworkers = 1\n");
        for i in 0..n {
            text.push_str(&format!(
                "[services.s{i}]\nplugin = \"echo\"\nlisten = \"127.0.0.1:0\"\n\
                 [services.s{i}.options]\ntransform = \"upper\"\n"
            ));
        }
        text
    };
    // The fastest of a few runs, so a loaded machine cannot make the small one look slow.
    let time = |n: usize, runs: usize| {
        let path = dir.write(&format!("{n}.toml"), &config(n));
        (0..runs)
            .map(|_| {
                let start = Instant::now();
                let out = wharf_env(&["check", "--config", path.to_str().unwrap()], &[]);
                let took = start.elapsed();
                assert!(out.status.success(), "{}", text(&out).1);
                took
            })
            .min()
            .unwrap()
    };
    let (small, large) = (time(400, 3), time(3200, 2));
    // 8x the services: linear is ~8x (less with the process's fixed costs); the quadratic
    // loader took ~64x (0.3 s against 20 s in release).
    let ratio = large.as_secs_f64() / small.as_secs_f64().max(0.001);
    println!("400 services: {small:?}, 3200 services: {large:?}, ratio {ratio:.1}");
    assert!(
        ratio < 24.0,
        "load time is superlinear: 400 services in {small:?}, 3200 in {large:?}"
    );
}
