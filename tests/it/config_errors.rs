//! Config errors as `sluice check` and `sluice run` print them: every problem
//! as `file:line:col: message` (1-based), pointing at the value at fault,
//! all of them at once, in file order, and never quoting a secret.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use sluice::config;

/// A route and a mock upstream: the smallest valid config, appended to the
/// fragments below (which therefore keep their own line numbers).
const BASE: &str = "\
upstreams:
  app:
    mock: {}
routes:
  - name: chat
    match: { path_prefix: / }
    upstream: app
";

fn load(yaml: &str, env: &[(&str, &str)]) -> Result<sluice::snapshot::Snapshot, Vec<String>> {
    let env: HashMap<String, String> = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    config::load_str(yaml, "test.yaml", Path::new("/nonexistent"), &|name| {
        env.get(name).cloned()
    })
    .map_err(|e| e.0.iter().map(ToString::to_string).collect())
}

/// The rendered error lines of a config that must be refused.
fn errors_with_env(yaml: &str, env: &[(&str, &str)]) -> Vec<String> {
    match load(yaml, env) {
        Ok(_) => panic!("this config was accepted but must be refused:\n{yaml}"),
        Err(lines) => lines,
    }
}

/// The head of a one-route config whose route `r` the tests complete
/// (upstream `a`); the route's own keys start on line 5.
const ROUTE_R: &str = "upstreams:\n  a: { url: \"http://127.0.0.1:1\" }\nroutes:\n  - name: r\n";

fn errors(yaml: &str) -> Vec<String> {
    errors_with_env(yaml, &[])
}

#[test]
fn unknown_key_is_rejected_at_its_position() {
    let yaml = format!("limits:\n  request_timout: 30s\n{BASE}");
    assert_eq!(
        errors(&yaml),
        [
            "test.yaml:2:3: unknown field `request_timout`, expected one of max_request_body, \
             max_buffered_bytes, header_read_timeout, request_timeout, max_connections, shutdown_grace"
        ]
    );
    // In a flow mapping too, and at the top level.
    let yaml = format!("limits: {{ request_timout: 30s }}\n{BASE}");
    let lines = errors(&yaml);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].starts_with("test.yaml:1:11: unknown field `request_timout`, expected one of "),
        "{lines:?}"
    );
    let yaml = format!("{BASE}listn: 127.0.0.1:8080\n");
    let lines = errors(&yaml);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].starts_with("test.yaml:8:1: unknown field `listn`, expected one of listen, "),
        "{lines:?}"
    );
}

/// `check` prints every error: each unknown key (block or flow style),
/// and then what compiling the rest finds (a bad duration, a route naming no upstream), in file
/// order, each at its own position.
#[test]
fn every_unknown_key_and_every_later_error_is_reported() {
    let yaml = "\
limits:
  request_timout: 30s
  header_read_timeout: soon
upstreams:
  app:
    mock: {}
    tiemouts:
      connect: 1s
routes:
  - name: chat
    match: { path_prefix: /, methds: [GET] }
    upstream: nowhere
    retries: 3
logging:
  levle: debug
";
    let lines = errors(yaml);
    // `file:line:col`, up to the third colon.
    let places: Vec<&str> = lines
        .iter()
        .map(|l| &l[..l.match_indices(':').nth(2).map_or(0, |(i, _)| i)])
        .collect();
    assert_eq!(
        places,
        [
            "test.yaml:2:3",
            "test.yaml:3:24",
            "test.yaml:7:5",
            "test.yaml:11:30",
            "test.yaml:12:15",
            "test.yaml:13:5",
            "test.yaml:15:3",
        ],
        "{lines:#?}"
    );
    assert!(
        lines[0].contains("unknown field `request_timout`"),
        "{lines:?}"
    );
    assert!(lines[2].contains("unknown field `tiemouts`"), "{lines:?}");
    assert!(lines[3].contains("unknown field `methds`"), "{lines:?}");
    assert!(lines[4].contains("nowhere"), "{lines:?}");
    assert!(lines[5].contains("unknown field `retries`"), "{lines:?}");
    assert!(lines[6].contains("unknown field `levle`"), "{lines:?}");
}

/// A kebab-case typo (`set-headers`) is an unknown key like any other:
/// reading goes on past it to the file's later errors.
#[test]
fn reading_goes_on_past_a_kebab_case_key() {
    let yaml = "\
upstreams:
  app:
    url: http://127.0.0.1:1
    set-headers:
      authorization: x
pools:
  p:
    members: [app]
    retry-on: [connect]
routes:
  - name: chat
    match: { path_prefix: / }
    upstream: nope
logging:
  levl: x
";
    let lines = errors(yaml);
    assert_eq!(lines.len(), 4, "{lines:#?}");
    assert!(
        lines[0].contains("unknown field `set-headers`"),
        "{lines:?}"
    );
    assert!(lines[1].contains("unknown field `retry-on`"), "{lines:?}");
    assert!(lines[2].contains("nope"), "{lines:?}");
    assert!(lines[3].contains("unknown field `levl`"), "{lines:?}");
}

/// Past its bound of errors, `check` says it stopped reading rather than
/// let the list look whole.
#[test]
fn a_file_with_too_many_errors_says_reading_stopped() {
    let mut yaml = String::from("limits:\n");
    for i in 0..40 {
        yaml.push_str(&format!("  typo_{i}: 1\n"));
    }
    yaml.push_str(BASE);
    let lines = errors(&yaml);
    assert_eq!(lines.len(), 34, "{lines:#?}");
    assert!(
        lines[33].ends_with("stopped reading after 33 errors; fix these and check again"),
        "{}",
        lines[33]
    );
}

#[test]
fn missing_variable_without_default_is_named() {
    let yaml = "\
upstreams:
  app:
    url: https://api.openai.com
    set_headers:
      authorization: \"Bearer ${OPENAI_API_KEY}\"
routes:
  - name: chat
    match: { path_prefix: / }
    upstream: app
";
    assert_eq!(
        errors(yaml),
        [
            "test.yaml:5:22: environment variable `OPENAI_API_KEY` is not set \
             (use `${OPENAI_API_KEY:-default}` for a default)"
        ]
    );
    // Once it is set the same file loads.
    assert!(load(yaml, &[("OPENAI_API_KEY", "sk-1")]).is_ok());
}

#[test]
fn variable_default_is_used_when_unset_and_the_value_when_set() {
    let yaml = format!("limits:\n  request_timeout: ${{TIMEOUT:-45s}}\n{BASE}");
    let unset = load(&yaml, &[]).expect("the default makes it valid");
    assert_eq!(unset.limits.request_timeout, Duration::from_secs(45));
    let set = load(&yaml, &[("TIMEOUT", "7s")]).expect("valid");
    assert_eq!(set.limits.request_timeout, Duration::from_secs(7));
    // Set but empty (`TIMEOUT= sluice run`): the default, as in the shell.
    let empty = load(&yaml, &[("TIMEOUT", "")]).expect("the default makes it valid");
    assert_eq!(empty.limits.request_timeout, Duration::from_secs(45));
    // A default is checked like any value, at the place it is written, and
    // quoted as written (a variable's value is never quoted).
    let yaml = format!("limits:\n  request_timeout: ${{TIMEOUT:-45x}}\n{BASE}");
    assert_eq!(
        errors(&yaml),
        ["test.yaml:2:20: `${TIMEOUT:-45x}` is not a duration like 250ms, 30s, 5m or 1h"]
    );
}

/// A default is put back as written once: a message never nests it in
/// itself, whatever its length.
#[test]
fn a_long_default_is_quoted_as_written_once() {
    let yaml = format!("logging:\n  format: \"${{FMT:-jsonlines}}\"\n{BASE}");
    assert_eq!(
        errors(&yaml),
        ["test.yaml:2:11: `${FMT:-jsonlines}` is not one of: json, text"]
    );
}

/// A default may name another variable, as in docker compose: a key
/// `${TEAM_KEY:-${FALLBACK_KEY}}` is never the literal text.
#[test]
fn a_default_may_name_another_variable() {
    let yaml = "\
auth:
  api_keys:
    - { id: a, key: \"${TEAM_KEY:-${FALLBACK_KEY}}\" }
upstreams:
  app: { mock: {} }
routes:
  - name: chat
    match: { path_prefix: / }
    upstream: app
";
    assert_eq!(
        errors(yaml),
        [
            "test.yaml:3:21: environment variable `FALLBACK_KEY` is not set \
          (use `${FALLBACK_KEY:-default}` for a default)"
        ]
    );
    assert!(load(yaml, &[("FALLBACK_KEY", "fallback-secret-123")]).is_ok());
}

#[test]
fn duration_with_an_unknown_unit_is_rejected() {
    let yaml = format!("limits:\n  request_timeout: 30x\n{BASE}");
    assert_eq!(
        errors(&yaml),
        ["test.yaml:2:20: `30x` is not a duration like 250ms, 30s, 5m or 1h"]
    );
}

#[test]
fn duration_without_a_unit_is_rejected() {
    let yaml = format!("limits:\n  shutdown_grace: 30\n{BASE}");
    assert_eq!(
        errors(&yaml),
        ["test.yaml:2:19: duration `30` needs a unit: ms, s, m or h"]
    );
}

#[test]
fn size_with_an_unknown_unit_is_rejected() {
    let yaml = format!("limits:\n  max_request_body: 4mb\n{BASE}");
    assert_eq!(
        errors(&yaml),
        ["test.yaml:2:21: `4mb` is not a size like 4096, 64KiB, 4MiB or 1GiB"]
    );
}

#[test]
fn route_to_an_unknown_upstream_points_at_the_upstream_value() {
    let yaml = "\
upstreams:
  app:
    mock: {}
routes:
  - name: chat
    match: { path_prefix: / }
    upstream: ap
";
    assert_eq!(
        errors(yaml),
        ["test.yaml:7:15: route `chat`: no upstream or pool named `ap`"]
    );
}

#[test]
fn pool_member_that_is_no_upstream_is_rejected() {
    let yaml = "\
upstreams:
  app:
    mock: {}
pools:
  llm:
    members: [app, ghost]
routes:
  - name: chat
    match: { path_prefix: / }
    upstream: llm
";
    assert_eq!(
        errors(yaml),
        ["test.yaml:6:20: pool `llm`: no upstream named `ghost`"]
    );
}

#[test]
fn duplicate_route_name_is_rejected_at_the_second_use() {
    let yaml = format!("{BASE}  - name: chat\n    match: {{ path: /health }}\n    upstream: app\n");
    assert_eq!(
        errors(&yaml),
        ["test.yaml:8:11: route name `chat` is used twice"]
    );
}

#[test]
fn api_key_naming_an_unknown_tier_is_rejected() {
    let yaml = format!(
        "{BASE}tiers:\n  free: {{ requests_per_minute: 5 }}\nauth:\n  api_keys:\n    - id: team-a\n      key: k1\n      tier: gold\n"
    );
    assert_eq!(
        errors(&yaml),
        ["test.yaml:14:13: no tier named `gold` under `tiers`"]
    );
}

#[test]
fn api_key_with_both_key_and_hash_is_rejected() {
    let yaml = format!(
        "{BASE}auth:\n  api_keys:\n    - id: team-a\n      key: test\n      hash: sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\n"
    );
    assert_eq!(
        errors(&yaml),
        ["test.yaml:10:7: api key `team-a` has both `key` and `hash`"]
    );
}

#[test]
fn api_key_with_neither_key_nor_hash_is_rejected() {
    let yaml = format!("{BASE}auth:\n  api_keys:\n    - id: team-a\n      routes: [chat]\n");
    assert_eq!(
        errors(&yaml),
        ["test.yaml:10:7: api key `team-a` needs a `key` or a `hash`"]
    );
}

#[test]
fn api_key_hash_in_another_format_is_rejected() {
    for hash in [
        "md5:098f6bcd4621d373cade4e832627b4f6",
        // One hex digit short.
        "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a0",
    ] {
        let yaml = format!("{BASE}auth:\n  api_keys:\n    - id: team-a\n      hash: {hash}\n");
        assert_eq!(
            errors(&yaml),
            [
                "test.yaml:11:13: api key `team-a`: hash must be `sha256:` and 64 hex digits \
                 (see `sluice hash-key`)"
            ],
            "hash {hash}"
        );
    }
}

#[test]
fn listen_address_that_does_not_parse_is_rejected() {
    let yaml = format!("listen: localhost:8080\nadmin:\n  listen: 9090\n{BASE}");
    assert_eq!(
        errors(&yaml),
        [
            "test.yaml:1:9: `localhost:8080` is not a listen address like 0.0.0.0:8080 or [::]:8080",
            "test.yaml:3:11: `9090` is not a listen address like 0.0.0.0:8080 or [::]:8080",
        ]
    );
}

#[test]
fn upstream_with_both_url_and_mock_is_rejected() {
    let yaml = "\
upstreams:
  app:
    url: http://127.0.0.1:8000
    mock: {}
routes:
  - name: chat
    match: { path_prefix: / }
    upstream: app
";
    assert_eq!(
        errors(yaml),
        ["test.yaml:3:5: upstream `app` has both `url` and `mock`; choose one"]
    );
}

#[test]
fn upstream_with_neither_url_nor_mock_is_rejected() {
    let yaml = "\
upstreams:
  app:
    timeouts: { connect: 2s }
routes:
  - name: chat
    match: { path_prefix: / }
    upstream: app
";
    assert_eq!(
        errors(yaml),
        ["test.yaml:3:5: upstream `app` needs a `url` or a `mock`"]
    );
}

#[test]
fn upstream_url_with_a_scheme_other_than_http_is_rejected() {
    let yaml = "\
upstreams:
  app:
    url: ftp://files.example.com
routes:
  - name: chat
    match: { path_prefix: / }
    upstream: app
";
    assert_eq!(
        errors(yaml),
        ["test.yaml:3:10: `ftp://files.example.com` is not an http:// or https:// URL"]
    );
}

#[test]
fn mock_failure_rate_outside_zero_to_one_is_rejected() {
    let yaml = "\
upstreams:
  app:
    mock: { failure_rate: 1.5 }
routes:
  - name: chat
    match: { path_prefix: / }
    upstream: app
";
    assert_eq!(
        errors(yaml),
        ["test.yaml:3:27: failure_rate `1.5` is not between 0.0 and 1.0"]
    );
    let below = yaml.replace("1.5", "-0.1");
    assert_eq!(
        errors(&below),
        ["test.yaml:3:27: failure_rate `-0.1` is not between 0.0 and 1.0"]
    );
}

#[test]
fn unknown_auth_mode_word_is_rejected() {
    let yaml = "\
upstreams:
  app:
    mock: {}
routes:
  - name: chat
    match: { path_prefix: / }
    auth: off
    upstream: app
";
    assert_eq!(
        errors(yaml),
        ["test.yaml:7:11: `off` is not one of: required, optional, none"]
    );
}

#[test]
fn scalars_are_kept_exactly_as_written() {
    // YAML would read `1.10` as the number 1.1 and `off` as false; a header
    // value, a model name or an error message must keep what was written.
    let yaml = "\
upstreams:
  app:
    mock: {}
    set_headers: { x-api-version: 1.10 }
    models: { gpt-4o: 2024.10 }
tiers:
  free: { tokens_per_minute: 500_000 }
routes:
  - name: chat
    match: { path_prefix: / }
    upstream: app
logging:
  log_bodies: yes
";
    let snapshot = load(yaml, &[]).unwrap_or_else(|e| panic!("{e:?}"));
    let app = &snapshot.upstreams[0];
    assert_eq!(
        app.set_headers[0].value.to_str().ok(),
        Some("1.10"),
        "set_headers value"
    );
    assert_eq!(
        app.models.get("gpt-4o").map(String::as_str),
        Some("2024.10")
    );
    assert_eq!(
        snapshot.tiers.get("free").and_then(|t| t.tokens_per_minute),
        Some(500_000)
    );
    assert!(snapshot.logging.log_bodies, "`yes` is true");
}

#[test]
fn every_error_in_a_file_is_reported_in_file_order() {
    // Checked in another order than written: `listen` first, `routes`
    // before `auth`. The report follows the file.
    let yaml = "\
tiers:
  free: { requests_per_minute: 5 }
auth:
  api_keys:
    - id: team-a
      key: k1
      tier: gold
upstreams:
  app:
    mock: { failure_rate: 2 }
routes:
  - name: chat
    match: { path_prefix: / }
    auth: maybe
    upstream: ghost
limits:
  request_timeout: 5y
listen: nowhere
";
    assert_eq!(
        errors(yaml),
        [
            "test.yaml:7:13: no tier named `gold` under `tiers`",
            "test.yaml:10:27: failure_rate `2` is not between 0.0 and 1.0",
            "test.yaml:14:11: `maybe` is not one of: required, optional, none",
            "test.yaml:15:15: route `chat`: no upstream or pool named `ghost`",
            "test.yaml:17:20: `5y` is not a duration like 250ms, 30s, 5m or 1h",
            "test.yaml:18:9: `nowhere` is not a listen address like 0.0.0.0:8080 or [::]:8080",
        ]
    );
}

#[test]
fn yaml_syntax_error_has_a_line_and_column() {
    let yaml = "limits:\n  request_timeout: 30s\n    shutdown_grace: 5s\n";
    assert_eq!(
        errors(yaml),
        ["test.yaml:3:19: mapping values are not allowed in this context"]
    );
    let yaml = "listen: \"127.0.0.1:8080\nroutes: []\n";
    assert_eq!(errors(yaml), ["test.yaml:1:9: unclosed quote"]);
}

#[test]
fn unreadable_file_is_reported_at_its_first_position() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("missing.yaml");
    let err = config::load(&path).expect_err("there is no file");
    assert_eq!(
        err.to_string(),
        format!(
            "{}:1:1: cannot read config: No such file or directory (os error 2)",
            path.display()
        )
    );
}

#[test]
fn errors_from_a_file_name_its_path_and_relative_files_resolve_beside_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("chat.json"), r#"{"type":"object"}"#).expect("schema");
    let path = dir.path().join("proxy.yaml");
    let good = format!("{BASE}    validate: {{ schema_file: chat.json }}\n");
    std::fs::write(&path, &good).expect("config");
    let snapshot = config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        matches!(
            &snapshot.routes[0].validate,
            sluice::snapshot::Validate::Schema(_)
        ),
        "schema_file must resolve against the config's directory: {:?}",
        snapshot.routes[0].validate
    );
    // A schema that does not compile, or is missing, is a config error.
    std::fs::write(dir.path().join("chat.json"), r#"{"type": 12}"#).expect("schema");
    let err = config::load(&path).expect_err("a bad schema is refused");
    assert!(
        err.to_string().contains("is not a valid JSON Schema"),
        "{err}"
    );
    std::fs::remove_file(dir.path().join("chat.json")).expect("remove schema");
    let err = config::load(&path).expect_err("a missing schema is refused");
    assert!(err.to_string().contains("cannot be read"), "{err}");

    std::fs::write(&path, format!("limits:\n  request_timout: 30s\n{BASE}")).expect("config");
    let err = config::load(&path).expect_err("the typo is refused");
    assert!(
        err.to_string().starts_with(&format!(
            "{}:2:3: unknown field `request_timout`",
            path.display()
        )),
        "{err}"
    );
}

#[test]
fn example_config_at_the_repo_root_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy.example.yaml");
    let snapshot = config::load(&path).unwrap_or_else(|e| panic!("proxy.example.yaml:\n{e}"));
    assert_eq!(snapshot.routes.len(), 1);
    assert_eq!(&*snapshot.routes[0].name, "chat");
    assert_eq!(snapshot.upstreams.len(), 2);
}

#[test]
fn secret_in_an_invalid_header_value_is_never_quoted() {
    let secret = "sk-live-4f3c2b1a\nx-injected: 1";
    let yaml = "\
upstreams:
  openai:
    url: https://api.openai.com
    set_headers: { authorization: \"Bearer ${KEY}\" }
routes:
  - name: chat
    match: { path_prefix: / }
    upstream: openai
";
    let lines = errors_with_env(yaml, &[("KEY", secret)]);
    assert_eq!(
        lines,
        [
            "test.yaml:4:35: upstream `openai`: the value of set_headers.authorization \
             is not a valid header value"
        ]
    );
    let all = lines.join("\n");
    assert!(!all.contains("sk-live-4f3c2b1a"), "{all}");
    assert!(!all.contains("x-injected"), "{all}");
}

#[test]
fn secret_in_an_invalid_upstream_url_is_never_quoted() {
    // A key in the query string: the URL is refused, quoted without it.
    let yaml = "\
upstreams:
  gemini:
    url: \"https://llm.example.com/v1?key=${GEMINI_KEY}\"
routes:
  - name: chat
    match: { path_prefix: / }
    upstream: gemini
";
    let lines = errors_with_env(yaml, &[("GEMINI_KEY", "AIzaSecret123")]);
    assert_eq!(
        lines,
        [
            "test.yaml:3:10: upstream url `https://llm.example.com/v1?…` \
             must not have a query string"
        ]
    );
    // Credentials in a URL taken whole from the environment.
    let yaml = yaml.replace(
        "\"https://llm.example.com/v1?key=${GEMINI_KEY}\"",
        "${FILES_URL}",
    );
    let lines = errors_with_env(
        &yaml,
        &[("FILES_URL", "ftp://bob:hunter2@files.example.com")],
    );
    assert_eq!(
        lines,
        ["test.yaml:3:10: `${FILES_URL}` is not an http:// or https:// URL"]
    );
}

/// URLs every request through would fail: no host (a variable set but
/// empty), a port that is no port. And a fragment, quoted to its `#`.
#[test]
fn an_upstream_url_without_a_host_or_with_no_port_is_refused() {
    let yaml = |url: &str| {
        format!(
            "upstreams:\n  app:\n    url: \"{url}\"\nroutes:\n  - name: r\n    match: {{ path_prefix: / }}\n    upstream: app\n"
        )
    };
    for (url, env, says) in [
        (
            "http://${APP_HOST}:8000",
            ("APP_HOST", ""),
            "upstream url `http://${APP_HOST}:8000` has no host (an empty variable?)",
        ),
        (
            "https://:443/v1",
            ("", ""),
            "upstream url `https://:443/v1` has no host (an empty variable?)",
        ),
        (
            "http://127.0.0.1:99999",
            ("", ""),
            "upstream url `http://127.0.0.1:99999` has a port that is not 1-65535",
        ),
        (
            "http://127.0.0.1:0",
            ("", ""),
            "upstream url `http://127.0.0.1:0` has a port that is not 1-65535",
        ),
        (
            "http://127.0.0.1:8000#frag",
            ("", ""),
            "upstream url `http://127.0.0.1:8000#…` must not have a fragment (#)",
        ),
    ] {
        let lines = errors_with_env(&yaml(url), &[env]);
        assert_eq!(lines, [format!("test.yaml:3:10: {says}")], "{url}");
    }
}

#[test]
fn ca_file_on_a_plain_http_upstream_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), "unused").unwrap();
    let yaml = "upstreams:\n  app:\n    url: http://127.0.0.1:8000\n    ca_file: ca.pem\nroutes:\n  - name: r\n    match: { path_prefix: / }\n    upstream: app\n";
    let err = config::load_str(yaml, "test.yaml", dir.path(), &|_| None).expect_err("refused");
    let lines: Vec<String> = err.0.iter().map(ToString::to_string).collect();
    assert_eq!(
        lines,
        ["test.yaml:4:14: ca_file only applies to https:// upstreams"]
    );
}

#[test]
fn a_config_without_routes_is_refused() {
    assert_eq!(
        errors(""),
        ["test.yaml:1:1: no routes: add at least one under `routes:`"]
    );
    assert_eq!(
        errors("listen: 127.0.0.1:8080\n"),
        ["test.yaml:1:1: no routes: add at least one under `routes:`"]
    );
}

/// `validate` is a string like any other: `${VAR}` works in its name and
/// in `schema_file`, and a missing variable is an error at its position.
#[test]
fn validate_expands_variables() {
    let snapshot = load(&format!("{BASE}    validate: ${{CHECKS:-openai}}\n"), &[])
        .unwrap_or_else(|e| panic!("{e:?}"));
    assert!(matches!(
        snapshot.routes[0].validate,
        sluice::snapshot::Validate::OpenAi
    ));
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("chat.json"), r#"{"type":"object"}"#).expect("schema");
    let yaml = format!("{BASE}    validate: {{ schema_file: \"${{SCHEMAS}}/chat.json\" }}\n");
    let dir_text = dir.path().display().to_string();
    let snapshot = load(&yaml, &[("SCHEMAS", &dir_text)]).unwrap_or_else(|e| panic!("{e:?}"));
    assert!(matches!(
        snapshot.routes[0].validate,
        sluice::snapshot::Validate::Schema(_)
    ));
    let errs = errors(&yaml);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].starts_with("test.yaml:8:15: "), "{errs:?}");
    assert!(errs[0].contains("SCHEMAS"), "{errs:?}");
}

/// A limit of 0 is refused: it reads as "no limit" to some and "refuse
/// all" to others; leaving the key out is how to have no limit.
#[test]
fn a_zero_limit_is_refused() {
    let yaml = format!(
        "tiers:\n  free: {{ requests_per_minute: 0, concurrent_requests: 0 }}\n{BASE}    rate_limit: {{ tokens_per_minute: 0 }}\n"
    );
    let errs = errors(&yaml);
    assert_eq!(errs.len(), 3, "{errs:?}");
    for (e, place) in errs.iter().zip(["2:32", "2:56", "10:38"]) {
        assert!(
            e.starts_with(&format!("test.yaml:{place}: a limit must be at least 1")),
            "{errs:?}"
        );
    }
}

/// A bound on all buffered bodies below one body's limit would refuse
/// every body near that limit: check says so.
#[test]
fn max_buffered_bytes_holds_at_least_one_body() {
    let errs = errors(&format!(
        "limits: {{ max_request_body: 8MiB, max_buffered_bytes: 4MiB }}\n{BASE}"
    ));
    assert_eq!(
        errs,
        [
            "test.yaml:1:55: max_buffered_bytes (4194304 bytes) is below max_request_body (8388608 bytes): one body at the limit would be refused"
        ],
        "{errs:?}"
    );
    // Left out, it is never below one body.
    assert!(
        load(
            &format!("limits: {{ max_request_body: 300MiB }}\n{BASE}"),
            &[]
        )
        .is_ok()
    );
}

/// A max_connections the listener cannot hold is refused by check, not
/// found by a panic at start.
#[test]
fn max_connections_is_bounded() {
    for value in ["0", "99999999999", "9999999999999999999"] {
        let errs = errors(&format!("limits: {{ max_connections: {value} }}\n{BASE}"));
        assert_eq!(
            errs,
            ["test.yaml:1:28: max_connections must be from 1 to 10000000"],
            "{value}"
        );
    }
}

/// A variable may hold a secret: an error about a value that came from
/// one quotes it as written, never the value.
#[test]
fn errors_quote_variables_as_written() {
    let secret = "sk-live-do-not-print-1234";
    for yaml in [
        format!("limits: {{ max_connections: \"${{TOKEN}}\" }}\n{BASE}"),
        format!("limits: {{ request_timeout: \"${{TOKEN}}\" }}\n{BASE}"),
        format!("limits: {{ max_request_body: \"${{TOKEN}}\" }}\n{BASE}"),
        format!("logging: {{ format: \"${{TOKEN}}\" }}\n{BASE}"),
        format!("listen: \"${{TOKEN}}\"\n{BASE}"),
        format!("{BASE}    validate: \"${{TOKEN}}\"\n"),
    ] {
        // Also with the blanks a value read from a file may end with.
        for value in [secret.to_owned(), format!(" {secret}\n")] {
            let errs = errors_with_env(&yaml, &[("TOKEN", &value)]);
            assert_eq!(errs.len(), 1, "{errs:?}");
            assert!(!errs[0].contains(secret), "{}", errs[0]);
            assert!(errs[0].contains("`${TOKEN}`"), "{}", errs[0]);
        }
    }
}

/// An upstream url from a variable is quoted as written, whatever
/// characters the value holds (a backtick ended the quote it was found by).
#[test]
fn a_bad_upstream_url_from_a_variable_is_quoted_as_written() {
    let yaml = "upstreams:\n  app: { url: \"${U}\" }\nroutes:\n  - { name: r, match: { path_prefix: / }, upstream: app }\n";
    for value in [
        "http://h/a`PATH-SECRET-65 x",
        "ftp://h/PATH-SECRET-65",
        "PATH-SECRET-65",
    ] {
        let errs = errors_with_env(yaml, &[("U", value)]);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(!errs[0].contains("PATH-SECRET-65"), "{}", errs[0]);
        assert!(errs[0].contains("`${U}`"), "{}", errs[0]);
    }
}

/// Messages that name what a value refers to (a tier, an upstream, a
/// pool member, a route) quote it as written too.
#[test]
fn references_from_variables_are_quoted_as_written() {
    let secret = "sk-upstream-SECRETVALUE3";
    for yaml in [
        format!("auth:\n  api_keys:\n    - {{ id: a, key: k, tier: \"${{TOKEN}}\" }}\n{BASE}"),
        format!("auth:\n  api_keys:\n    - {{ id: a, key: k, routes: [\"${{TOKEN}}\"] }}\n{BASE}"),
        format!("pools:\n  p: {{ members: [\"${{TOKEN}}\"] }}\n{BASE}"),
        format!("{ROUTE_R}    match: {{ path_prefix: / }}\n    upstream: \"${{TOKEN}}\"\n"),
    ] {
        let errs = errors_with_env(&yaml, &[("TOKEN", secret)]);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(!errs[0].contains(secret), "{}", errs[0]);
        assert!(errs[0].contains("`${TOKEN}`"), "{}", errs[0]);
    }
}

/// One route to the upstream `app`, written `{ <settings> }` on line 2.
fn one_upstream(settings: &str) -> String {
    format!(
        "upstreams:\n  app: {{ {settings} }}\nroutes:\n  - name: chat\n    match: {{ path_prefix: / }}\n    upstream: app\n"
    )
}

/// Credentials in an upstream URL are refused, without repeating them:
/// they would be sent on as the request's authority, not as auth.
#[test]
fn upstream_url_credentials_are_refused_unquoted() {
    let errs = errors(&one_upstream(
        "url: \"https://user:s3cret-pass@llm.example.com\"",
    ));
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].starts_with("test.yaml:2:15: an upstream url must not carry credentials"),
        "{errs:?}"
    );
    assert!(!errs[0].contains("s3cret"), "{errs:?}");
    // An `@` in the path is no credential (Vertex model ids have one).
    let vertex = one_upstream("url: https://llm.example.com/v1/models/claude-sonnet-4@20250514");
    load(&vertex, &[]).unwrap_or_else(|e| panic!("{e:?}"));
}

/// Files a config names are read only when they are regular files of at
/// most 16 MiB: `/dev/zero` is an error, not a process out of memory.
#[test]
fn named_files_must_be_regular_and_bounded() {
    let errs = errors(&one_upstream(
        "url: \"https://llm.example.com\", ca_file: /dev/zero",
    ));
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].contains("cannot read ca_file /dev/zero: not a regular file"),
        "{errs:?}"
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let big = std::fs::File::create(dir.path().join("big.json")).expect("create");
    big.set_len(sluice::config::FILE_CAP + 1)
        .expect("sparse file");
    let yaml = format!("{BASE}    validate: {{ schema_file: big.json }}\n");
    let err = config::load_str(&yaml, "test.yaml", dir.path(), &|_| None)
        .expect_err("a 16 MiB + 1 schema is refused");
    assert!(err.to_string().contains("larger than 16 MiB"), "{err}");
}

/// A URL written with its secret in it is never quoted with the secret:
/// not when it cannot be parsed, not when it has a query, not when a
/// variable elsewhere in it made it differ from what was written.
#[test]
fn a_literal_secret_in_an_upstream_url_is_never_quoted() {
    for url in [
        "https://bob:pa#ss@llm.example.com",
        "https://llm.example.com/v1?key=AIzaSecret123",
        "https://${HOST:-llm.example.com}/v1?key=AIzaSecret123",
        // A token in the path: a bad port, backslashes, an `@` in it.
        "https://api.telegram.org:99999/botAIzaSecret123-0123456789/",
        "https://h.example.com\\\\hooks\\\\AIzaSecret123-backslash",
        "https://h.example.com:99999/hooks/AIzaSecret123@user-1234567",
    ] {
        let errs = errors(&one_upstream(&format!("url: \"{url}\"")));
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            !errs[0].contains("pa#ss")
                && !errs[0].contains("AIzaSecret123")
                && !errs[0].contains("user-1234567"),
            "{errs:?}"
        );
    }
    // A header line pasted whole as a set_headers name, and a value
    // that YAML reads as a tag.
    for header in [
        r#""Authorization: Bearer AIzaSecret123-0123": """#,
        "x-api-key: !AIzaSecret123-0123",
    ] {
        let yaml = one_upstream(&format!(
            "url: \"https://llm.example.com\", set_headers: {{ {header} }}"
        ));
        let errs = errors(&yaml);
        assert!(
            errs.iter()
                .any(|e| e.contains("not a valid header name") || e.contains("YAML tag")),
            "{errs:?}"
        );
        assert!(
            !errs.iter().any(|e| e.contains("AIzaSecret123")),
            "{errs:?}"
        );
    }
}

/// Reading past an unknown key never reports an error the user did not
/// make: a misspelt only key leaves its mapping empty (a mock with
/// defaults), and a misspelt required key is not then called missing.
#[test]
fn reading_past_unknown_keys_invents_no_errors() {
    let yaml = "\
upstreams:
  app:
    mock:
      latncy: 5ms
routes:
  - nme: chat
    match: { path_prefix: / }
    upstream: app
";
    let errs = errors(yaml);
    assert_eq!(errs.len(), 2, "{errs:?}");
    assert!(
        errs[0].starts_with("test.yaml:4:7: unknown field `latncy`"),
        "{errs:?}"
    );
    assert!(
        errs[1].starts_with("test.yaml:6:5: unknown field `nme`"),
        "{errs:?}"
    );
}

/// Reading past an unknown key goes on to report a later error of
/// another kind: a value of the wrong shape, a bad number.
#[test]
fn an_unknown_key_does_not_hide_a_later_error() {
    let yaml = "limits:\n  request_timout: 30s\nupstreams: [app]\nroutes: []\n";
    let errs = errors(yaml);
    assert_eq!(errs.len(), 2, "{errs:?}");
    assert!(errs[1].starts_with("test.yaml:3:"), "{errs:?}");
    let yaml = format!("limits:\n  request_timout: 30s\n  max_connections: abc\n{BASE}");
    let errs = errors(&yaml);
    assert_eq!(errs.len(), 2, "{errs:?}");
    assert!(
        errs[1].starts_with("test.yaml:3:20: `abc` is not"),
        "{errs:?}"
    );
}

/// A value of the wrong type does not hide the errors after it: the value
/// is read as absent and the rest of the file is checked.
#[test]
fn a_value_of_the_wrong_type_does_not_stop_the_check() {
    let errs = errors(
        "\
limits:
  request_timeout: 30
upstreams:
  a: { url: \"http://127.0.0.1:1\" }
routes:
  - name: r
    match: { path_prefix: /, methods: GET }
    upstream: nope
    tokens_per_minut: 5
",
    );
    assert_eq!(errs.len(), 4, "{errs:#?}");
    assert!(
        errs[0].starts_with("test.yaml:2:20: duration `30` needs a unit"),
        "{errs:#?}"
    );
    assert!(errs[1].starts_with("test.yaml:7:39: "), "{errs:#?}");
    assert!(
        errs[2].starts_with("test.yaml:8:15: route `r`: no upstream or pool named `nope`"),
        "{errs:#?}"
    );
    assert!(
        errs[3].starts_with("test.yaml:9:5: unknown field `tokens_per_minut`"),
        "{errs:#?}"
    );
}

/// A required key that is missing is reported beside an unknown key,
/// unless the unknown key is its misspelling (one error, reported once).
#[test]
fn a_missing_key_is_reported_unless_it_was_misspelt() {
    let errs = errors(&[ROUTE_R, "    match: { path_prefix: / }\n    bogus: 1\n"].concat());
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert!(
        errs.iter().any(|e| e.contains("missing field `upstream`")),
        "{errs:#?}"
    );
    assert!(
        errs.iter().any(|e| e.contains("unknown field `bogus`")),
        "{errs:#?}"
    );
    let errs = errors(&[ROUTE_R, "    match: { path_prefix: / }\n    upstrem: a\n"].concat());
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(
        errs[0].starts_with("test.yaml:6:5: unknown field `upstrem`"),
        "{errs:#?}"
    );
    // The typo before the mapping's other keys, too.
    let errs = errors(&[ROUTE_R, "    upstrem: a\n    match: { path_prefix: / }\n"].concat());
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(
        errs[0].starts_with("test.yaml:5:5: unknown field `upstrem`"),
        "{errs:#?}"
    );
}

/// A missing required key does not end the check: the keys around it,
/// and the rest of the file, are still checked and reported, each at the
/// mapping that lacks it.
#[test]
fn missing_required_keys_are_reported_with_every_other_error() {
    let errs = errors(
        "\
tls: { cert_file: /x }
upstreams:
  a: { url: \"http://127.0.0.1:1\" }
pools:
  p: { members: [a], health_check: { interval: 1s } }
auth:
  api_keys:
    - { key: abc, routes: [r1] }
routes:
  - name: r1
    match: { path_prefix: /, bogus: 1 }
  - name: r2
    match: { path: /x }
    upstream: nope
pricing:
  m: { input: 1 }
limits:
  max_request_body: 4XB
",
    );
    assert_eq!(
        errs,
        [
            "test.yaml:1:6: missing field `key_file`",
            "test.yaml:5:36: missing field `path`",
            "test.yaml:8:7: missing field `id`",
            "test.yaml:10:5: missing field `upstream`",
            "test.yaml:11:30: unknown field `bogus`, expected one of path_prefix, path, host, methods",
            "test.yaml:14:15: route `r2`: no upstream or pool named `nope`",
            "test.yaml:16:6: missing field `output`",
            "test.yaml:18:21: `4XB` is not a size like 4096, 64KiB, 4MiB or 1GiB",
        ]
    );
    // A value of the wrong type is one error: its key is not then also
    // reported missing.
    let errs = errors(&[ROUTE_R, "    match: /v1/\n    upstream: a\n"].concat());
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(errs[0].starts_with("test.yaml:5:12: "), "{errs:#?}");
}

/// Recovery never invents errors: a value of the wrong type whose key
/// must have one stops the check after that error, once.
#[test]
fn a_required_value_of_the_wrong_type_is_reported_once() {
    let errs = errors(
        "\
upstreams:
  openai: { url: \"http://127.0.0.1:1\" }
pools:
  llm:
    members: openai
routes:
  - name: r
    match: { path_prefix: / }
    upstream: llm
",
    );
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(errs[0].starts_with("test.yaml:5:14: "), "{errs:#?}");
    // A flow mapping spread over lines is not cut blindly.
    let errs = errors(
        &[
            ROUTE_R,
            "    match: { path_prefix: /,\n      methods: GET }\n    upstream: a\n",
        ]
        .concat(),
    );
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(errs[0].starts_with("test.yaml:6:16: "), "{errs:#?}");
}

/// The parser's messages in sluice's words, not the library's.
#[test]
fn duplicate_keys_and_bad_validate_values_are_said_plainly() {
    let errs = errors(
        "\
upstreams:
  a: { url: \"http://127.0.0.1:1\" }
  a: { url: \"http://127.0.0.1:2\" }
routes:
  - name: r
    match: { path_prefix: / }
    upstream: a
",
    );
    assert_eq!(errs, ["test.yaml:3:3: duplicate key `a`"]);
    // A key written twice (a copy-paste slip) does not hide the file's
    // other errors, before it or after it, nor the checks that need the
    // whole file read.
    let errs = errors(
        "\
listen: not-an-address
upstreams:
  a: { url: \"http://127.0.0.1:1\" }
  a:
    url: \"http://127.0.0.1:2\"
    timeouts: { connect: 5s }
limits: { max_connections: 0 }
routes:
  - name: r
    match: { path_prefix: / }
    upstream: nosuch
    cache: { ttl: 1h }
    cache: { ttl: 2h }
",
    );
    assert_eq!(errs.len(), 5, "{errs:#?}");
    assert!(errs[0].starts_with("test.yaml:1:9: "), "{errs:#?}");
    assert_eq!(errs[1], "test.yaml:4:3: duplicate key `a`");
    assert!(errs[2].starts_with("test.yaml:7:"), "{errs:#?}");
    assert!(errs[3].starts_with("test.yaml:11:15: "), "{errs:#?}");
    assert_eq!(errs[4], "test.yaml:13:5: duplicate key `cache`");
    let errs = errors(&[ROUTE_R, "    match: { path_prefix: / }\n    upstream: a\n    validate: { schema_fil: x.json }\n"].concat());
    assert_eq!(
        errs,
        ["test.yaml:7:15: validate must be none, openai or { schema_file: PATH }"]
    );
}

/// Pool settings that would disable what they set up are refused: no
/// attempt at all, a circuit that opens on nothing, or health checks
/// sent back to back without a pause.
#[test]
fn pool_settings_of_zero_are_refused() {
    let errs = errors(
        "\
upstreams:
  a: { url: \"http://127.0.0.1:1\" }
pools:
  p:
    members: [a]
    max_attempts: 0
    circuit_breaker: { failures: 0 }
    health_check: { path: /health, interval: 0s }
routes:
  - name: r
    match: { path_prefix: / }
    upstream: p
",
    );
    assert_eq!(
        errs,
        [
            "test.yaml:6:19: max_attempts must be at least 1",
            "test.yaml:7:34: circuit_breaker.failures must be at least 1",
            "test.yaml:8:46: health_check.interval must be at least 50ms",
        ]
    );
}

/// The admin listener and the proxy listener cannot share a port: `check`
/// says so, rather than `run` failing to bind.
#[test]
fn admin_and_proxy_listeners_on_one_port_are_refused() {
    for (listen, admin) in [
        ("127.0.0.1:8080", "127.0.0.1:8080"),
        ("0.0.0.0:8080", "127.0.0.1:8080"),
        ("\"[::]:8080\"", "127.0.0.1:8080"),
        ("127.0.0.1:8080", "\"[::ffff:127.0.0.1]:8080\""),
        ("\"[::ffff:0.0.0.0]:8080\"", "127.0.0.1:8080"),
    ] {
        let errs = errors(&format!(
            "listen: {listen}\nadmin: {{ listen: {admin} }}\n{BASE}"
        ));
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].starts_with("test.yaml:2:18: admin.listen") && errs[0].contains("share a port"),
            "{errs:?}"
        );
    }
    for (listen, admin) in [
        ("127.0.0.1:8080", "127.0.0.2:8080"),
        ("0.0.0.0:8080", "\"[::1]:8080\""),
    ] {
        let yaml = format!("listen: {listen}\nadmin: {{ listen: {admin} }}\n{BASE}");
        assert!(load(&yaml, &[]).is_ok(), "{yaml}");
    }
}

/// Timeouts of zero would refuse every client: refused.
#[test]
fn zero_timeouts_are_refused() {
    let errs = errors(&format!(
        "limits: {{ header_read_timeout: 0s, request_timeout: 0ms }}\n{BASE}"
    ));
    assert_eq!(
        errs,
        [
            "test.yaml:1:32: header_read_timeout must be above 0",
            "test.yaml:1:53: request_timeout must be above 0",
        ]
    );
}

/// `redis_url`: the scheme in any case; one error for a variable that is
/// not set (not a second one saying the URL is missing); other schemes
/// are named in the message.
#[test]
fn redis_urls_are_checked_once_and_said_plainly() {
    let state = |url: &str| format!("state: {{ backend: redis, redis_url: \"{url}\" }}\n{BASE}");
    assert!(load(&state("REDIS://127.0.0.1:6379/2"), &[]).is_ok());
    assert_eq!(
        errors(&state("${REDIS_URL}")),
        [
            "test.yaml:1:37: environment variable `REDIS_URL` is not set (use `${REDIS_URL:-default}` for a default)"
        ]
    );
    for url in [
        "unix:///run/redis.sock",
        "rediss://cache:6380",
        "cache:6379",
    ] {
        assert_eq!(
            errors(&state(url)),
            [
                "test.yaml:1:37: redis_url must be redis://host[:port][/db], with user:password@ \
                 before the host if Redis needs them (rediss:// TLS and unix sockets are not supported)"
            ],
            "{url}"
        );
    }
}

/// The one error of a config that must be refused, whatever its place.
fn one_error(yaml: &str, env: &[(&str, &str)]) -> String {
    let lines = errors_with_env(yaml, env);
    assert_eq!(lines.len(), 1, "{lines:?}");
    lines[0].clone()
}

/// Values that would break the gateway at its first use are refused
/// by `check`, not found at run time.
#[test]
fn values_that_would_break_every_request_are_refused() {
    let upstream = |timeouts: &str| {
        format!(
            "upstreams:\n  a: {{ url: \"http://127.0.0.1:1\", timeouts: {{ {timeouts} }} }}\nroutes:\n  - {{ name: r, match: {{ path_prefix: / }}, upstream: a }}\n"
        )
    };
    for (key, message) in [
        ("connect: 0s", "timeouts.connect must be above 0"),
        ("first_byte: 0s", "timeouts.first_byte must be above 0"),
        ("idle: 0ms", "timeouts.idle must be above 0"),
    ] {
        let e = one_error(&upstream(key), &[]);
        assert!(e.ends_with(message), "{e}");
    }
    let e = one_error(&format!("limits: {{ max_request_body: 0 }}\n{BASE}"), &[]);
    assert!(e.ends_with("max_request_body must be above 0"), "{e}");
    // It would turn every route's cache off, silently.
    let e = one_error(&format!("cache: {{ max_bytes: 0 }}\n{BASE}"), &[]);
    assert!(
        e.starts_with("test.yaml:1:21: cache.max_bytes must be above 0"),
        "{e}"
    );
    let e = one_error(
        "upstreams:\n  a: { url: \"http://127.0.0.1:1\" }\npools:\n  p: { members: [a], health_check: { path: /h, interval: 1ms } }\nroutes:\n  - { name: r, match: { path_prefix: / }, upstream: p }\n",
        &[],
    );
    assert!(
        e.ends_with("health_check.interval must be at least 50ms"),
        "{e}"
    );
    let e = one_error(
        &format!(
            "{ROUTE_R}    match: {{ path_prefix: / }}\n    cache: {{ ttl: 0s }}\n    upstream: a\n"
        ),
        &[],
    );
    assert!(e.ends_with("cache.ttl must be above 0"), "{e}");
    let e = one_error(&format!("budget: {{ daily_usd: 0 }}\n{BASE}"), &[]);
    assert!(
        e.ends_with("daily_usd must be above 0 (leave it out for no budget)"),
        "{e}"
    );
    for url in [
        "not a url",
        "ftp://hooks.example",
        "http://127.0.0.1:99999/",
    ] {
        let e = one_error(
            &format!("budget: {{ daily_usd: 1, webhook_url: \"{url}\" }}\n{BASE}"),
            &[],
        );
        assert!(
            e.ends_with("webhook_url must be an http:// or https:// URL with a host"),
            "{url}: {e}"
        );
    }
}

/// A route `host` or a CORS origin that no request could ever match is
/// refused; a final dot and a `*.` wildcard are read as requests are.
#[test]
fn hosts_and_origins_that_could_never_match_are_refused() {
    let route = |matcher: &str| format!("{ROUTE_R}    match: {{ {matcher} }}\n    upstream: a\n");
    for host in [
        "api.local:8080",
        "https://api.local",
        "api local",
        "a.*.local",
        "",
    ] {
        let e = one_error(&route(&format!("host: \"{host}\"")), &[]);
        assert!(
            e.contains("host must be a host name like api.example.com"),
            "{host}: {e}"
        );
    }
    for host in ["API.local.", "*.example.com", "[::1]"] {
        assert!(
            load(&route(&format!("host: \"{host}\"")), &[]).is_ok(),
            "{host}"
        );
    }
    let cors = |origins: &str, credentials: bool| {
        format!(
            "{ROUTE_R}    match: {{ path_prefix: / }}\n    cors: {{ allow_origins: [{origins}], allow_credentials: {credentials} }}\n    upstream: a\n"
        )
    };
    for origin in [
        "\"https://app.example.com/\"",
        "\"app.example.com\"",
        "\"https://app.example.com/x\"",
        // A `*` matches only as the first label, over a domain.
        "\"https://*.com\"",
        "\"https://app*.example.com\"",
        "\"https://*.*.example.com\"",
        "\"*.example.com\"",
        "\"https://*\"",
    ] {
        let e = one_error(&cors(origin, false), &[]);
        assert!(e.contains("an origin as browsers send it"), "{origin}: {e}");
    }
    assert!(
        load(
            &cors(
                "\"https://*.example.com\", \"http://*.example.com:3000\"",
                true
            ),
            &[]
        )
        .is_ok()
    );
    let e = one_error(&cors("", false), &[]);
    assert!(e.contains("allow_origins is empty"), "{e}");
    assert!(e.starts_with("test.yaml:6:11:"), "points at cors: {e}");
    // Left out, it is one error among the file's others.
    let errs = errors(&format!(
        "{ROUTE_R}    match: {{ path_prefix: / }}\n    cors: {{ max_age: 10m }}\n    upstream: a\n    auth: nope\n"
    ));
    assert_eq!(errs.len(), 2, "{errs:?}");
    assert!(
        errs[0].starts_with("test.yaml:6:11: missing field `allow_origins`"),
        "{errs:?}"
    );
    assert!(errs[1].contains("nope"), "{errs:?}");
    assert!(
        load(
            &cors(
                "\"https://app.example.com\", \"http://localhost:3000\"",
                true
            ),
            &[]
        )
        .is_ok()
    );
    // An unset optional origin is no origin.
    assert!(
        load(
            &cors("\"https://app.example.com\", \"${DEV_ORIGIN:-}\"", true),
            &[]
        )
        .is_ok()
    );
    // `*` with credentials is refused also when a variable writes it.
    let e = one_error(&cors("\"https://a.example\", \"${ORIGIN:-*}\"", true), &[]);
    assert!(
        e.contains("cannot be combined with allow_credentials"),
        "{e}"
    );
    assert!(e.starts_with("test.yaml:6:50:"), "points at the `*`: {e}");
}

/// A tier's daily budget with nothing to act on it (no alert_at, no
/// enforce) is accepted, with a warning that says so.
#[test]
fn a_budget_that_cannot_act_is_a_warning() {
    let yaml = format!("tiers:\n  metered: {{ daily_budget_usd: 0.01 }}\n{BASE}");
    let snapshot = load(&yaml, &[]).expect("valid");
    let warnings: Vec<String> = snapshot.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(
        warnings,
        [
            "test.yaml:2:32: warning: tier `metered`: daily_budget_usd does nothing without budget.alert_at or budget.enforce: true"
        ]
    );
    let yaml = format!(
        "budget: {{ alert_at: [0.5] }}\ntiers:\n  metered: {{ daily_budget_usd: 0.01 }}\n{BASE}"
    );
    assert!(load(&yaml, &[]).expect("valid").warnings.is_empty());
}

/// The parser's own words (its option names, its internals) are said as
/// a user of sluice reads them.
#[test]
fn parser_messages_are_in_a_users_words() {
    assert_eq!(
        errors(&format!("{BASE}---\nlisten: 127.0.0.1:1\n")),
        [
            "test.yaml:9:1: the file holds more than one YAML document (a `---` line between them); a config is one"
        ]
    );
    assert_eq!(
        errors("- a\n- b\n"),
        ["test.yaml:1:1: expected a mapping here (`key: value` lines)"]
    );
}

/// `none` labels the requests no route matched and identities without a
/// tier in the metrics: a route or tier so named would mix with them.
#[test]
fn route_and_tier_named_none_are_rejected() {
    let yaml = "\
upstreams:
  app:
    mock: {}
tiers:
  none: { requests_per_minute: 5 }
routes:
  - name: none
    match: { path_prefix: / }
    upstream: app
";
    let errors = errors(yaml);
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors[0].starts_with("test.yaml:5:9: tier name `none` is reserved"),
        "{errors:?}"
    );
    assert!(
        errors[1].starts_with("test.yaml:7:11: route name `none` is reserved"),
        "{errors:?}"
    );
}

/// A value holding a newline is quoted escaped: each error stays one line.
#[test]
fn an_error_quoting_a_newline_stays_one_line() {
    let yaml = format!("listen: \"127.0.0.1:1\\nINJECTED: x\"\n{BASE}");
    assert_eq!(
        errors(&yaml),
        [
            "test.yaml:1:9: `127.0.0.1:1\\nINJECTED: x` is not a listen address like 0.0.0.0:8080 or [::]:8080"
        ]
    );
}

/// A value that variables made is said to be theirs (its default may
/// look valid), still without the value: it could be a secret.
#[test]
fn a_value_made_by_variables_says_so() {
    let yaml = format!("listen: \"${{LISTEN:-127.0.0.1:8080}}\"\n{BASE}");
    let errs = errors_with_env(&yaml, &[("LISTEN", "localhost:8080")]);
    assert_eq!(
        errs,
        [
            "test.yaml:1:9: `${LISTEN:-127.0.0.1:8080}` is not a listen address like 0.0.0.0:8080 \
             or [::]:8080 (as its variables made it; their values are not shown)"
        ]
    );
}

/// Names label metrics and log lines: an empty or blank one, or one
/// holding a control character, labels nothing a reader can find.
#[test]
fn blank_names_are_refused() {
    let yaml = "\
upstreams:
  \"\": { mock: {} }
  \"a\\tb\": { mock: {} }
  ok: { mock: {} }
tiers:
  \" \": {}
auth:
  api_keys:
    - { id: \"\", key: k1 }
routes:
  - name: \"  \"
    match: { path_prefix: / }
    upstream: ok
";
    assert_eq!(
        errors(yaml),
        [
            "test.yaml:2:7: upstream name is empty",
            "test.yaml:3:11: upstream name `a\\tb` holds a control character",
            "test.yaml:6:8: tier name is empty",
            "test.yaml:9:13: api key id is empty",
            "test.yaml:11:11: route name is empty",
        ]
    );
}

/// `set_headers` cannot set what frames a message or belongs to one
/// connection, nor name a header twice in two spellings.
#[test]
fn set_headers_refuse_framing_hop_by_hop_and_twice_named_headers() {
    for (name, why) in [
        ("content-length", "it frames the body"),
        ("Transfer-Encoding", "it frames the body"),
        ("connection", "hop-by-hop"),
        ("upgrade", "hop-by-hop"),
        ("te", "hop-by-hop"),
        ("keep-alive", "hop-by-hop"),
    ] {
        let errs = errors(&one_upstream(&format!(
            "url: \"http://127.0.0.1:1\", set_headers: {{ {name}: x }}"
        )));
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].contains(&format!(
                "set_headers cannot set `{}`",
                name.to_ascii_lowercase()
            )) && errs[0].contains(why),
            "{}",
            errs[0]
        );
    }
    let errs = errors(&one_upstream(
        "url: \"http://127.0.0.1:1\", set_headers: { Authorization: a, authorization: b }",
    ));
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].contains("names `authorization` twice"),
        "{}",
        errs[0]
    );
    assert!(
        !errs[0].contains(": a") && !errs[0].contains(": b"),
        "{}",
        errs[0]
    );
}

/// An upstream whose URL is one of sluice's own listeners would send
/// each request back to sluice, without end.
#[test]
fn an_upstream_that_is_sluice_itself_is_refused() {
    for url in [
        "http://127.0.0.1:8080",
        "http://localhost:8080/v1",
        "http://[::1]:8080",
        "http://127.0.0.1:9090",
        // Spellings the resolver reads as loopback too.
        "http://127.1:8080",
        "http://localhost.:8080",
        "http://[::ffff:127.0.0.1]:8080",
    ] {
        let yaml = format!(
            "listen: \"[::]:8080\"\n{}",
            one_upstream(&format!("url: \"{url}\""))
        );
        assert_eq!(
            errors(&yaml),
            [
                "test.yaml:3:15: upstream `app` is sluice itself (it listens there): its requests would loop"
            ],
            "{url}"
        );
    }
    // Another port, or an address sluice does not listen on, is fine.
    for (listen, url) in [
        ("0.0.0.0:8080", "http://127.0.0.1:8081"),
        ("127.0.0.1:8080", "http://10.0.0.5:8080"),
        ("0.0.0.0:8080", "https://api.openai.com"),
        // IPv4's any-address does not take IPv6's loopback.
        ("0.0.0.0:8080", "http://[::1]:8080"),
    ] {
        let yaml = format!(
            "listen: \"{listen}\"\n{}",
            one_upstream(&format!("url: \"{url}\""))
        );
        assert!(load(&yaml, &[]).is_ok(), "{listen} {url}");
    }
}

/// A whole number too large for its setting is said to be too large.
#[test]
fn a_number_too_large_is_said_so() {
    let errs = errors(&format!(
        "pools:\n  p: {{ members: [app], max_attempts: 99999999999999999999999 }}\n{BASE}"
    ));
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].contains("is too large"), "{}", errs[0]);
}

/// Every unset variable of a value is named, not only the first.
#[test]
fn every_unset_variable_of_a_value_is_named() {
    let errs = errors(&format!("listen: \"${{NA}}:${{NB}}\"\n{BASE}"));
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].contains("variables `NA`, `NB` are not set"),
        "{}",
        errs[0]
    );
    // Those of a default too.
    let errs = errors(&format!("listen: \"${{NA}}:${{NB:-${{NC}}}}\"\n{BASE}"));
    assert!(
        errs[0].contains("variables `NA`, `NC` are not set"),
        "{}",
        errs[0]
    );
}

/// A reference whose variable is unset is one error, not also a second
/// about an upstream named ``.
#[test]
fn an_unset_variable_in_a_reference_is_one_error() {
    let yaml = "upstreams:\n  a: { mock: {} }\nroutes:\n  - { name: r, match: { path_prefix: / }, upstream: \"${UP}\" }\n";
    let errs = errors(yaml);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].contains("`UP` is not set"), "{}", errs[0]);
}

/// Limits and amounts past any real use are refused: their arithmetic
/// would overflow into nonsense (`inf` costs, headers that disagree).
#[test]
fn limits_and_amounts_past_any_real_use_are_refused() {
    let errs = errors(&format!(
        "tiers:\n  t: {{ requests_per_minute: 18446744073709551615 }}\n{BASE}"
    ));
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].contains("a limit must be at most"), "{}", errs[0]);
    let errs = errors(&format!(
        "pricing:\n  m: {{ input: 1e308, output: 1 }}\n{BASE}"
    ));
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].contains("at most 1000000000 USD"), "{}", errs[0]);
    // Every bad price of an entry at once, not one per `check`.
    let errs = errors(&format!(
        "pricing:\n  m: {{ input: 1000000001, output: -1, cached_input: x, cache_write: -2 }}\n{BASE}"
    ));
    assert_eq!(errs.len(), 4, "{errs:?}");
    for (err, col) in errs.iter().zip([15, 35, 53, 69]) {
        assert!(err.starts_with(&format!("test.yaml:2:{col}: ")), "{errs:?}");
    }
    assert!(
        load(
            &format!("tiers:\n  t: {{ requests_per_minute: 60_000_000_000 }}\n{BASE}"),
            &[]
        )
        .is_ok()
    );
    // Past one a nanosecond, a bucket would not hold what it says.
    let errs = errors(&format!(
        "tiers:\n  t: {{ tokens_per_minute: 100_000_000_000 }}\n{BASE}"
    ));
    assert!(
        errs.len() == 1 && errs[0].contains("at most 60000000000"),
        "{errs:?}"
    );
}

/// The mock's `status` is what its injected failures answer: an error.
#[test]
fn a_mock_failure_status_must_be_an_error() {
    let errs = errors(&one_upstream("mock: { failure_rate: 0.5, status: 200 }"));
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].contains("`200` is not an HTTP error status"),
        "{}",
        errs[0]
    );
    assert!(
        load(
            &one_upstream("mock: { failure_rate: 0.5, status: 429 }"),
            &[]
        )
        .is_ok()
    );
}

/// A key no header can carry (a newline from a Secret made by `echo`
/// inside it) is refused, and not quoted.
#[test]
fn an_api_key_holding_a_control_character_is_refused_unquoted() {
    let errs = errors_with_env(
        &format!("auth:\n  api_keys:\n    - {{ id: a, key: \"${{K}}\" }}\n{BASE}"),
        &[("K", "sk-part-one\nsk-part-two")],
    );
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].contains("holds a control character"), "{}", errs[0]);
    assert!(!errs[0].contains("sk-part"), "{}", errs[0]);
}

/// A CORS method or header name that is no token would never match a
/// browser's preflight: refused rather than silently useless.
#[test]
fn cors_methods_and_headers_must_be_tokens() {
    let errs = errors(&format!(
        "{BASE}    cors: {{ allow_origins: [\"https://a.example\"], allow_methods: [\"bad method\"], allow_headers: [\"x-ok\", \"bad header\"] }}\n"
    ));
    assert_eq!(errs.len(), 2, "{errs:?}");
    assert!(
        errs[0].contains("`bad method` is not an HTTP method"),
        "{}",
        errs[0]
    );
    assert!(
        errs[1].contains("`bad header` is not a header name"),
        "{}",
        errs[1]
    );
}

/// An empty file path, and a threshold listed twice, are said plainly.
#[test]
fn an_empty_path_and_a_repeated_threshold_are_said_plainly() {
    let errs = errors(&one_upstream("url: \"https://127.0.0.1:1\", ca_file: \"\""));
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].ends_with("the file path is empty"), "{}", errs[0]);
    // Also two fractions one alert would tell apart by less than a
    // thousandth.
    for list in ["[0.8, 0.5, 0.80]", "[0.8, 0.8004]"] {
        let errs = errors(&format!(
            "budget: {{ daily_usd: 1, alert_at: {list} }}\n{BASE}"
        ));
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(errs[0].contains("twice"), "{}", errs[0]);
    }
    // A fraction too large for a number is not "below 0".
    let errs = errors(&format!(
        "budget: {{ daily_usd: 1, alert_at: [1e400] }}\n{BASE}"
    ));
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].ends_with("alert_at `1e400` is no finite fraction"),
        "{}",
        errs[0]
    );
    // A route name whose variable is unset is one error, not also "empty".
    let yaml = "upstreams:\n  a: { mock: {} }\nroutes:\n  - { name: \"${RN}\", match: { path_prefix: / }, upstream: a }\n";
    assert_eq!(errors(yaml).len(), 1, "{:?}", errors(yaml));
    // An empty claim name would read a claim called "".
    let errs = errors(&format!(
        "auth:\n  jwt: {{ hs256_secret: jwt-secret-0123456789abcdef, identity_claim: \"\", tier_claim: \" \" }}\n{BASE}"
    ));
    assert_eq!(errs.len(), 2, "{errs:?}");
    assert!(
        errs[0].ends_with("identity_claim is empty: name the token claim to read"),
        "{errs:?}"
    );
    assert!(
        errs[1].ends_with("tier_claim is empty: name the token claim to read"),
        "{errs:?}"
    );
}

/// A section left with nothing under it, its entries commented out:
/// `tls:` would otherwise serve plain HTTP to a user who asked for TLS,
/// and an empty map of upstreams, pools, tiers or prices is just empty,
/// as an empty `limits:` or `auth:` is.
#[test]
fn sections_written_empty() {
    let e = one_error(
        &format!(
            "tls:\n  # cert_file: /etc/sluice/tls.crt\n  # key_file: /etc/sluice/tls.key\n{BASE}"
        ),
        &[],
    );
    assert!(
        e.starts_with("test.yaml:1:") && e.contains("tls is empty: give it cert_file and key_file"),
        "{e}"
    );
    let empty =
        format!("pools:\n  # p: {{ members: [app] }}\ntiers:\npricing:\nlimits:\nauth:\n{BASE}");
    let snapshot = load(&empty, &[]).unwrap_or_else(|e| panic!("{e:#?}"));
    assert!(snapshot.tls.is_none());
    let e = one_error(
        "upstreams:\nroutes:\n  - { name: r, match: { path_prefix: / }, upstream: a }\n",
        &[],
    );
    assert!(e.ends_with("no upstream or pool named `a`"), "{e}");
    assert_eq!(
        errors("routes:\nupstreams:\n  a: { mock: {} }\n"),
        ["test.yaml:1:1: no routes: add at least one under `routes:`"]
    );
    // Inside sections too: a route's `cache:`, a `mock:`, a tier, the
    // api keys, written with nothing under them, are as `{}` or `[]`:
    // the route caches, the mock answers, the tier limits nothing.
    let nested = "\
upstreams:
  a:
    mock:
    # failure_rate: 0.5
tiers:
  free:
    # requests_per_minute: 5
auth:
  api_keys:
    # - { id: x, key: y }
routes:
  - name: r
    match: { path_prefix: / }
    upstream: a
    cache:
      # ttl: 1m
";
    let snapshot = load(nested, &[]).unwrap_or_else(|e| panic!("{e:#?}"));
    assert!(snapshot.routes[0].cache.is_some());
    assert!(snapshot.tiers.contains_key("free"));
}

/// A value of the wrong shape (a list where one value belongs, one value
/// or nothing where a list or mapping belongs) does not end the reading:
/// every other error of the file is still reported, those before it
/// included, and the stand-in sluice reads in its place adds none.
#[test]
fn values_of_the_wrong_shape_do_not_hide_the_other_errors() {
    let errs = errors(
        "\
listen: not-an-address
upstreams:
  a: { url: \"http://user:pw@127.0.0.1:1\" }
  b:
    url: \"http://127.0.0.1:2\"
    set_headers: { x-api-key: [a, b] }
  nullup:
pools:
  p: { members: a }
  q:
    members: b
routes:
  - name: r
    match: { path_prefix: /, methods: GET }
    upstream: nosuch
admin: { listen: [::]:9090 }
",
    );
    let at: Vec<String> = errs
        .iter()
        .map(|e| e.split(": ").next().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(
        at,
        [
            "test.yaml:1:9",
            "test.yaml:3:13",
            "test.yaml:6:31",
            "test.yaml:7:9",
            "test.yaml:9:17",
            "test.yaml:11:14",
            "test.yaml:14:39",
            "test.yaml:15:15",
            "test.yaml:16:18",
        ],
        "{errs:#?}"
    );
    assert!(
        errs[4].ends_with("expected a list here (`[a, b]`, or `- a` lines)"),
        "{errs:#?}"
    );
    assert!(
        errs[8].contains("quote a value that starts with `[`"),
        "{errs:#?}"
    );
    // What the stand-in draws (a pool with no members, a cors with no
    // origins, no routes) is left out; the real errors beside it (on its
    // line too) are not, nor is a comment after it taken for one.
    let errs = errors(
        "\
upstreams:
  a: { mock: {}, set_headers: { x-title: Bob's bot } }
pools:
  q:
    max_attempts: 2
    members: a # the primary
routes:
  - { name: r, match: { path_prefix: v1, methods: GET }, upstream: nosuch }
  - name: c
    match: { path_prefix: /c }
    upstream: q
    cors: { allow_origins: x.com }
",
    );
    let at: Vec<&str> = errs
        .iter()
        .map(|e| e.split(": ").next().unwrap_or_default())
        .collect();
    assert_eq!(
        at,
        [
            "test.yaml:6:14",
            "test.yaml:8:38",
            "test.yaml:8:51",
            "test.yaml:8:68",
            "test.yaml:12:28"
        ],
        "{errs:#?}"
    );
    assert_eq!(
        errors("routes: foo\nupstreams:\n  a: { mock: {} }\n"),
        ["test.yaml:1:9: expected a list here (`[a, b]`, or `- a` lines)"]
    );
}

/// Values out of range that variables made are quoted as the file
/// writes them, never as the variables made them, as every other error
/// quotes them (a variable may hold a secret).
#[test]
fn values_out_of_range_are_quoted_as_written() {
    let errs = errors_with_env(
        "\
upstreams:
  app:
    mock: { failure_rate: \"${FR}\", status: \"${ST:-277}\" }
routes:
  - name: chat
    match: { path_prefix: / }
    upstream: app
budget:
  daily_usd: ${DU:-5.5}
  alert_at: [\"${AA}\", 0.8, \"${AB}\"]
listen: 127.0.0.1:26100
admin: { listen: \"${ADM}\" }
",
        &[
            ("FR", "2"),
            ("AA", "-0.77"),
            ("AB", "0.80"),
            ("DU", "1e10"),
            ("ADM", "127.0.0.1:26100"),
        ],
    );
    assert_eq!(
        errs,
        [
            "test.yaml:3:27: failure_rate `${FR}` is not between 0.0 and 1.0 (as its variables made it; their values are not shown)",
            "test.yaml:3:44: `${ST:-277}` is not an HTTP error status (400-599), as an injected failure answers",
            "test.yaml:9:14: `${DU:-5.5}` must be a non-negative amount of at most 1000000000 USD (as its variables made it; their values are not shown)",
            "test.yaml:10:14: alert_at `${AA}` must be above 0 (as its variables made it; their values are not shown)",
            "test.yaml:10:28: alert_at lists `${AB}` twice (as its variables made it; their values are not shown)",
            "test.yaml:12:18: admin.listen ${ADM} and listen 127.0.0.1:26100 share a port; give each its own",
        ]
    );
}

/// A tier whose name is a near miss of one callers get, and that no one
/// is given, is a typo that would leave those callers unlimited: a
/// warning says so. A tier merely unused (ready for keys to come) is
/// not one, nor is any tier when JWTs name tiers.
#[test]
fn a_misspelt_tier_that_no_one_gets_is_warned_of() {
    let warnings = |yaml: &str| -> Vec<String> {
        load(yaml, &[])
            .unwrap_or_else(|e| panic!("{e:#?}"))
            .warnings
            .iter()
            .map(ToString::to_string)
            .collect()
    };
    let w = warnings(&format!(
        "tiers:\n  anonymus: {{ requests_per_minute: 1 }}\n  fre: {{}}\n  gold: {{}}\n{BASE}"
    ));
    assert_eq!(
        w,
        [
            "test.yaml:2:13: warning: tier `anonymus` is given to no one (no api key names it, and it is not default_tier or `anonymous`): did you mean `anonymous`?",
            "test.yaml:3:8: warning: tier `fre` is given to no one (no api key names it, and it is not default_tier or `anonymous`): did you mean `free`?",
        ]
    );
    let by_tokens = format!(
        "auth:\n  jwt: {{ hs256_secret: 0123456789abcdef0123456789abcdef, tier_claim: tier }}\ntiers:\n  anonymus: {{}}\n{BASE}"
    );
    assert!(warnings(&by_tokens).is_empty());
}

/// An empty list that would make a route or a JWT check refuse
/// everything is an error, as `alert_at` and `allow_origins` are; so is
/// a list naming one entry twice, which is always a slip.
#[test]
fn empty_and_repeated_lists_are_errors() {
    let errs = errors(
        "\
upstreams:
  a: { mock: {} }
  b: { mock: {} }
pools:
  p: { members: [a, b], retry_on: [connect, 502, \"502\"] }
auth:
  jwt: { hs256_secret: not-a-real-secret-but-long-enough-0123456789, algorithms: [] }
routes:
  - name: none-allowed
    match: { path_prefix: /a/, methods: [] }
    upstream: a
  - name: twice
    match: { path_prefix: /b/, methods: [GET, post, POST] }
    upstream: p
",
    );
    assert_eq!(
        errs,
        [
            "test.yaml:5:50: retry_on lists `502` twice",
            "test.yaml:7:8: jwt: algorithms is empty, so no token could be accepted; list them, or leave algorithms out for the default",
            "test.yaml:9:5: match: methods is empty, so no request could match this route; list the methods, or leave methods out to match every method",
            "test.yaml:13:53: methods lists `POST` twice",
        ]
    );
}

/// A variable set to nothing is quoted as the file writes it too, not
/// as an empty "``" that says nothing of where it came from.
#[test]
fn an_empty_variable_is_quoted_as_written() {
    let errs = errors_with_env(
        "listen: \"${LST}\"\nupstreams:\n  a: { mock: {} }\nroutes:\n  - { name: r, match: { path_prefix: / }, upstream: a }\n",
        &[("LST", "")],
    );
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].starts_with("test.yaml:1:9: `${LST}` is not a listen address"),
        "{errs:?}"
    );
}

/// A null where a value belongs says so in plain words, and the rest of
/// the file is still read.
#[test]
fn a_null_value_is_one_error_among_the_others() {
    let errs = errors(
        "\
upstreams:
  llm:
    url: http://127.0.0.1:9
    set_headers: { authorization: ~, x-org: \"o\" }
    timeouts: { connect: 5x }
routes:
  - name: chat
    match: { path_prefix: / }
    upstream: null
limits: { request_timeout: 30x }
",
    );
    assert_eq!(
        errs,
        [
            "test.yaml:4:35: a value is needed here, not null (`~` or `null`; quote it to mean the text)",
            "test.yaml:5:26: `5x` is not a duration like 250ms, 30s, 5m or 1h",
            // An optional key set to null is absent, and this one is required.
            "test.yaml:7:5: missing field `upstream`",
            "test.yaml:10:28: `30x` is not a duration like 250ms, 30s, 5m or 1h",
        ]
    );
}

/// A route path that no request path can hold (a query, a space, a
/// letter beyond ASCII: clients send them percent-encoded) is refused:
/// the route would answer nothing, silently.
#[test]
fn a_route_path_no_request_can_have_is_refused() {
    for (written, held) in [
        ("path: \"/v1/models?x=1\"", "'?'"),
        ("path_prefix: \"/ü/\"", "'ü'"),
        ("path_prefix: \"/a b\"", "' '"),
        ("path: \"/a#b\"", "'#'"),
    ] {
        let errs = errors(&format!(
            "routes:\n  - name: r\n    match: {{ {written} }}\n    upstream: app\nupstreams:\n  app:\n    mock: {{}}\n"
        ));
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(errs[0].starts_with("test.yaml:3:"), "{errs:?}");
        assert!(errs[0].contains(&format!("holds {held}")), "{errs:?}");
    }
    // A variable's value is never quoted.
    let errs = errors_with_env(
        "routes:\n  - name: r\n    match: { path_prefix: \"${P}\" }\n    upstream: app\nupstreams:\n  app:\n    mock: {}\n",
        &[("P", "/k€y")],
    );
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].contains("holds a character (from a variable)") && !errs[0].contains('€'),
        "{errs:?}"
    );
    assert!(load("routes:\n  - name: r\n    match: { path_prefix: /%C3%BC/ }\n    upstream: app\nupstreams:\n  app:\n    mock: {}\n", &[]).is_ok());
}

/// A route listed after one that takes every request it would is never
/// reached: said at its place, naming the route that shadows it (a
/// catch-all `auth: none` route above a guarded one leaves it open).
#[test]
fn a_route_shadowed_by_an_earlier_one_is_warned_of() {
    let yaml = "upstreams:\n  app:\n    mock: {}\nroutes:\n  - name: all\n    match: {}\n    auth: none\n    upstream: app\n  - name: guarded\n    match: { path_prefix: /v1/ }\n    upstream: app\n  - name: models\n    match: { path: /v1/models, methods: [GET] }\n    upstream: app\n";
    let snapshot = load(yaml, &[]).expect("valid");
    let warnings: Vec<String> = snapshot.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(warnings[0].starts_with("test.yaml:9:"), "{warnings:?}");
    assert!(
        warnings[0].contains("route `guarded` is never reached: route `all`"),
        "{warnings:?}"
    );
    assert!(
        warnings[1].contains("route `models` is never reached: route `all`"),
        "{warnings:?}"
    );
    // More specific first, as routes should be: nothing to say.
    let ordered = "upstreams:\n  app:\n    mock: {}\nroutes:\n  - name: models\n    match: { path: /v1/models, methods: [GET] }\n    upstream: app\n  - name: other-host\n    match: { host: a.example, path_prefix: /v1/ }\n    upstream: app\n  - name: guarded\n    match: { path_prefix: /v1/ }\n    upstream: app\n  - name: all\n    match: {}\n    auth: none\n    upstream: app\n";
    assert!(load(ordered, &[]).expect("valid").warnings.is_empty());
    // A GET route takes HEAD; a CORS route also takes its preflights,
    // which a POST route before it does not.
    let head = "upstreams:\n  app:\n    mock: {}\nroutes:\n  - name: get\n    match: { path_prefix: /g/, methods: [GET] }\n    upstream: app\n  - name: head\n    match: { path_prefix: /g/x, methods: [HEAD] }\n    upstream: app\n";
    assert_eq!(load(head, &[]).expect("valid").warnings.len(), 1);
    let cors = "upstreams:\n  app:\n    mock: {}\nroutes:\n  - name: post\n    match: { path_prefix: /v1/, methods: [POST] }\n    upstream: app\n  - name: corsy\n    match: { path_prefix: /v1/chat, methods: [POST] }\n    cors: { allow_origins: [\"*\"] }\n    upstream: app\n";
    assert!(load(cors, &[]).expect("valid").warnings.is_empty());
    // A host under an earlier wildcard is one of its hosts; the domain
    // itself is not.
    let hosts = "upstreams:\n  app:\n    mock: {}\nroutes:\n  - name: wild\n    match: { host: \"*.example.com\" }\n    upstream: app\n  - name: api\n    match: { host: api.example.com, path_prefix: /v1 }\n    upstream: app\n  - name: apex\n    match: { host: example.com }\n    upstream: app\n";
    let warnings: Vec<String> = load(hosts, &[])
        .expect("valid")
        .warnings
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("route `api` is never reached: route `wild`"),
        "{warnings:?}"
    );
    // A narrower method list does not cover a wider one.
    let methods = "upstreams:\n  app:\n    mock: {}\nroutes:\n  - name: get\n    match: { path_prefix: /v1/, methods: [GET] }\n    upstream: app\n  - name: any\n    match: { path_prefix: /v1/ }\n    upstream: app\n";
    assert!(load(methods, &[]).expect("valid").warnings.is_empty());
}

/// A tab in a line's indentation is pointed at where it is, not where
/// the YAML scanner stood when it met it (the end of the line before).
#[test]
fn a_tab_indenting_a_line_is_reported_at_the_tab() {
    let errs = errors(
        "upstreams:\n  llm:\n    mock: {}\nroutes:\n  - name: chat\n    match:\n      path_prefix: /v1/\n\tupstream: llm\n",
    );
    assert_eq!(
        errs,
        ["test.yaml:8:1: a tab in this line's indentation: YAML indents with spaces only"]
    );
    let errs = errors(
        "upstreams:\n  llm:\n    mock: {}\nroutes:\n  - name: chat\n    match: { path_prefix: /v1/ }\n  \t  upstream: llm\n",
    );
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].starts_with("test.yaml:7:3: a tab"), "{errs:?}");
}
