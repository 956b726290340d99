//! Configuration errors, exactly as an operator reads them: `temma check` (the real binary) on
//! a table of bad configurations, each with the whole message it must print. Every message
//! names the key (and the environment variable when one set it), the file, the value given,
//! and what to write instead.
// Tests may unwrap: a failure is the test failing (the library may not: Cargo.toml [lints]).
#![allow(clippy::unwrap_used)]

mod common;

use common::{TempDir, manifest_dir, temma};

/// One bad configuration: its TOML (`{root}` is the repository), environment overrides, and
/// the problems `temma check` must list, in order (`{root}` replaced too).
struct Case {
    toml: &'static str,
    env: &'static [(&'static str, &'static str)],
    problems: &'static [&'static str],
}

const CASES: &[Case] = &[
    // A near miss gets "did you mean"; every key allowed there is listed.
    Case {
        toml: "[server]\nlistn = \"127.0.0.1:8000\"\n",
        env: &[],
        problems: &[
            "`server.listn`: unknown key `listn`; did you mean `listen`? (the keys here: `listen`, `static_dir`, `shutdown_grace_secs`, `write_stall_timeout_secs`, `head_timeout_secs`, `body_timeout_secs`, `max_connections`, `max_pending_heads`, `socket_send_buffer_bytes`, `cors_origins`, `trusted_proxies`)",
        ],
    },
    Case {
        toml: "[serverr]\nlisten = \"127.0.0.1:8000\"\n",
        env: &[],
        problems: &[
            "`serverr`: unknown key `serverr`; did you mean `server`? (the keys here: `application`, `server`, `broker`, `message`, `event`, `rooms`, `access`, `console`, `log`, `runtime`)",
        ],
    },
    // Array positions are written as in TOML's arrays of tables.
    Case {
        toml: "[[broker.scripts]]\nfil = \"scripts/trim.rhai\"\n",
        env: &[],
        problems: &[
            "`broker.scripts[0].fil`: unknown key `fil`; did you mean `file`? (the keys here: `file`, `params`, `name`, `on_error`)",
        ],
    },
    Case {
        toml: "[[broker.scripts]]\nname = \"trim\"\n",
        env: &[],
        problems: &["`broker.scripts[0]`: `file` is missing: it is required here"],
    },
    // Wrong types and ranges: the value given, and what to write.
    Case {
        toml: "[server]\nlisten = 8000\n",
        env: &[],
        problems: &["`server.listen`: the number `8000` is not a string (in quotes)"],
    },
    Case {
        toml: "[server]\nmax_connections = \"many\"\n",
        env: &[],
        problems: &[
            "`server.max_connections`: the string \"many\" is not a whole number, 0 or more",
        ],
    },
    Case {
        toml: "[server]\nmax_connections = -1\n",
        env: &[],
        problems: &[
            "`server.max_connections`: the number `-1` is out of range: write a whole number, 0 or more",
        ],
    },
    Case {
        toml: "[server]\nsocket_send_buffer_bytes = 5000000000\n",
        env: &[],
        problems: &[
            "`server.socket_send_buffer_bytes`: the number `5000000000` is out of range: write a whole number from 0 to 4294967295",
        ],
    },
    Case {
        toml: "[message]\npublish_timeout_ms = 1.5\n",
        env: &[],
        problems: &[
            "`message.publish_timeout_ms`: the number `1.5` is not a whole number, 0 or more",
        ],
    },
    Case {
        toml: "[broker]\nembedded = \"yes\"\n",
        env: &[],
        problems: &["`broker.embedded`: the string \"yes\" is not `true` or `false`"],
    },
    Case {
        toml: "[server]\ncors_origins = \"https://chat.example.com\"\n",
        env: &[],
        problems: &[
            "`server.cors_origins`: the string \"https://chat.example.com\" is not an array (`[…]`)",
        ],
    },
    // Choices: the value and the choices, quoted once (no garbled backticks).
    Case {
        toml: "[log]\nformat = \"xml\"\n",
        env: &[],
        problems: &["`log.format`: `xml` is not a choice: write \"text\" or \"json\""],
    },
    Case {
        toml: "[broker]\non_error = \"maybe\"\n",
        env: &[],
        problems: &["`broker.on_error`: `maybe` is not a choice: write \"drop\" or \"pass\""],
    },
    // Addresses and data sources: the value and the accepted forms.
    Case {
        toml: "[server]\nlisten = \"example:80\"\n",
        env: &[],
        problems: &[
            "`server.listen`: `example:80` is not an address to listen on: write IP:PORT, such as `127.0.0.1:8000`, `0.0.0.0:8000` or `[::1]:8000`, or `localhost:8000` or `*:8000`",
        ],
    },
    Case {
        toml: "[application.dataSources]\nzmq_client_push = \"zmq://PUSH@127.0.0.1\"\n",
        env: &[],
        problems: &[
            "`application.dataSources.zmq_client_push`: DSN `zmq://PUSH@127.0.0.1`: endpoint `127.0.0.1` has no `:port`; valid forms: `zmq://TYPE@HOST:PORT` (connect) or `zmq-bind://TYPE@HOST:PORT` (bind), several endpoints separated by `;`; TYPE is one of PUSH, PULL, PUB, SUB, REQ, REP, ROUTER, DEALER; an endpoint is `127.0.0.1:5000`, `localhost:5000`, `*:5000` (bind only), `[::1]:5000` or `ipc:///absolute/path`",
        ],
    },
    Case {
        toml: "[broker]\npull = \"zmq_client_push\"\n",
        env: &[],
        problems: &[
            "`broker.pull`: data source `zmq_client_push` is a PUSH socket (`zmq://PUSH@127.0.0.1:5000`), but this role needs a PULL socket",
        ],
    },
    // Values out of bounds say the value; every problem is listed at once.
    Case {
        toml: "[message]\nqueue = 0\n[event]\nmax_clients = 0\n",
        env: &[],
        problems: &[
            "`message.queue`: is 0: must be at least 1",
            "`event.max_clients`: is 0: must be at least 1",
        ],
    },
    // The console's token lives in the environment, never in the file.
    Case {
        toml: "[console]\nenabled = true\n",
        env: &[],
        problems: &[
            "`console.token_env`: names the environment variable `TEMMA_CONSOLE_TOKEN`, which is not set: the console (`console.enabled = true`) needs its token there, at least 16 characters",
        ],
    },
    Case {
        toml: "[console]\nenabled = true\n",
        env: &[("TEMMA_CONSOLE_TOKEN", "short")],
        problems: &[
            "`console.token_env`: the token in `TEMMA_CONSOLE_TOKEN` has 5 characters: at least 16",
        ],
    },
    Case {
        toml: "[broker]\nscript_workers = 0\n",
        env: &[],
        problems: &["`broker.script_workers`: is 0: must be from 1 to 64"],
    },
    Case {
        toml: "[runtime]\nworker_threads = 5000\n",
        env: &[],
        problems: &["`runtime.worker_threads`: 5000 threads: at most 1024 (0 for one per CPU)"],
    },
    Case {
        toml: "",
        env: &[("TEMMA_RUNTIME__WORKER_THREADS", "many")],
        problems: &[
            "`runtime.worker_threads` (from environment variable TEMMA_RUNTIME__WORKER_THREADS): the string \"many\" is not a whole number, 0 or more",
        ],
    },
    Case {
        toml: "[runtime]\nscheduling = \"fifo\"\n",
        env: &[],
        problems: &["`runtime.scheduling`: `fifo` is not a choice: write \"batch\" or \"normal\""],
    },
    Case {
        toml: "[runtime]\nhuge_pages = \"no\"\n",
        env: &[],
        problems: &["`runtime.huge_pages`: the string \"no\" is not `true` or `false`"],
    },
    // Files: where temma looked, and the script by position and name.
    Case {
        toml: "[[broker.scripts]]\nfile = \"scripts/nope.rhai\"\n",
        env: &[],
        problems: &[
            "`broker.scripts[0] (nope)`: cannot read script `scripts/nope.rhai` (looked for `{root}/scripts/nope.rhai`): No such file or directory (os error 2)",
        ],
    },
    Case {
        toml: "[server]\nstatic_dir = \"nope\"\n",
        env: &[],
        problems: &[
            "`server.static_dir`: folder `nope` does not exist (looked for `{root}/nope`; relative paths start at the application root `{root}`)",
        ],
    },
    Case {
        toml: "[[broker.scripts]]\nfile = \"scripts/profanity.rhai\"\nparams = { words_file = \"scripts/nowords.txt\" }\n",
        env: &[],
        problems: &[
            "`broker.scripts[0] (profanity)`: script `scripts/profanity.rhai`, parameter `words_file`: cannot read `scripts/nowords.txt` (looked for `{root}/scripts/nowords.txt`): No such file or directory (os error 2)",
        ],
    },
    // Environment overrides are named, for type errors and for validation alike.
    Case {
        toml: "",
        env: &[("TEMMA_SERVER__MAX_CONNECTIONS", "lots")],
        problems: &[
            "`server.max_connections` (from environment variable TEMMA_SERVER__MAX_CONNECTIONS): the string \"lots\" is not a whole number, 0 or more",
        ],
    },
    Case {
        toml: "",
        env: &[("TEMMA_EVENT__QUEUE", "0")],
        problems: &[
            "`event.queue` (from environment variable TEMMA_EVENT__QUEUE): is 0: must be at least 1",
        ],
    },
    Case {
        toml: "",
        env: &[("TEMMA_SERVER__LISTN", "127.0.0.1:1")],
        problems: &[
            "`server.listn` (from environment variable TEMMA_SERVER__LISTN): unknown key `listn`; did you mean `listen`? (the keys here: `listen`, `static_dir`, `shutdown_grace_secs`, `write_stall_timeout_secs`, `head_timeout_secs`, `body_timeout_secs`, `max_connections`, `max_pending_heads`, `socket_send_buffer_bytes`, `cors_origins`, `trusted_proxies`)",
        ],
    },
    // TOML syntax: one line, with the line and column and the text at fault.
    Case {
        toml: "garbage =\n",
        env: &[],
        problems: &["line 3, column 10: invalid string; expected `\"`, `'` (in `garbage =`)"],
    },
];

#[test]
fn every_bad_configuration_gets_its_exact_message() {
    let dir = TempDir::new("config-errors");
    let root = manifest_dir().display().to_string();
    let path = dir.0.join("temma.toml");
    let mut failures = Vec::new();
    for case in CASES {
        std::fs::write(
            &path,
            format!("[application]\nroot = \"{root}\"\n{}", case.toml),
        )
        .unwrap();
        let mut command = temma(&["check", "-c", path.to_str().unwrap()]);
        for (key, value) in case.env {
            command.env(key, value);
        }
        let output = command.output().unwrap();
        let count = case.problems.len();
        let mut expected = format!(
            "temma: invalid configuration in `{}` ({count} problem{}):\n",
            path.display(),
            if count == 1 { "" } else { "s" }
        );
        for problem in case.problems {
            expected.push_str(&format!("  - {}\n", problem.replace("{root}", &root)));
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        if output.status.code() != Some(78) || stderr != expected {
            failures.push(format!(
                "config:\n{}env: {:?}\nexit: {:?}\nexpected:\n{expected}got:\n{stderr}",
                case.toml,
                case.env,
                output.status.code()
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n---\n"));
}

/// What the messages promise to accept is accepted: a choice in any case, the address forms.
#[test]
fn the_forms_the_messages_name_are_accepted() {
    let dir = TempDir::new("config-forms");
    let root = manifest_dir().display().to_string();
    let path = dir.0.join("temma.toml");
    for toml in [
        "[broker]\non_error = \"Drop\"\n",
        "[broker]\non_error = \"PASS\"\n",
        "[server]\nlisten = \"localhost:28000\"\n",
        "[server]\nlisten = \"*:28000\"\n",
        "[server]\nlisten = \"[::1]:28000\"\n",
        "[log]\nformat = \"json\"\n",
    ] {
        std::fs::write(&path, format!("[application]\nroot = \"{root}\"\n{toml}")).unwrap();
        let output = temma(&["check", "-c", path.to_str().unwrap()])
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(0), "{toml}: {output:?}");
    }
}
