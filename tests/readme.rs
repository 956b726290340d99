//! The documentation's commands, kept true: every `temma …` command in a shell block of the
//! README files (and in their inline code) names a subcommand and flags that exist, and a
//! command shown with its output (`# …` lines after it) prints that output.
// Tests may unwrap: a failure is the test failing (the library may not: Cargo.toml [lints]).
#![allow(clippy::unwrap_used)]

mod common;

use common::{manifest_dir, temma};

/// The documents whose commands are checked.
const DOCUMENTS: [&str; 3] = ["README.md", "scripts/README.md", "BENCHMARKS.md"];

/// A word of a shell line, and whether any of it was quoted.
struct Word {
    text: String,
    quoted: bool,
}

/// Splits a shell line into words (single and double quotes, backslash escapes), stopping at
/// an unquoted `#`, `&`, `|`, `;` or `>`.
fn words(line: &str) -> Vec<Word> {
    let mut words = Vec::new();
    let mut current: Option<Word> = None;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' | '"' => {
                let word = current.get_or_insert(Word {
                    text: String::new(),
                    quoted: true,
                });
                word.quoted = true;
                for inner in chars.by_ref() {
                    if inner == c {
                        break;
                    }
                    word.text.push(inner);
                }
            }
            '\\' => {
                if let Some(next) = chars.next() {
                    current
                        .get_or_insert(Word {
                            text: String::new(),
                            quoted: false,
                        })
                        .text
                        .push(next);
                }
            }
            '#' | '&' | '|' | ';' | '>' if current.is_none() => break,
            c if c.is_whitespace() => words.extend(current.take()),
            c => current
                .get_or_insert(Word {
                    text: String::new(),
                    quoted: false,
                })
                .text
                .push(c),
        }
    }
    words.extend(current);
    words
}

/// The arguments a documented command line gives `temma`, if it runs temma: `temma ARGS`,
/// `target/release/temma ARGS` or `cargo run [--release] [-- ARGS]`, after any `VAR=value`.
fn temma_args(line: &str) -> Option<Vec<String>> {
    let words = words(line);
    let mut rest = words
        .iter()
        .skip_while(|word| !word.quoted && word.text.contains('=') && !word.text.starts_with('-'));
    let program = rest.next()?;
    let args: Vec<&Word> = match program.text.as_str() {
        "temma" | "target/release/temma" | "target/debug/temma" => rest.collect(),
        "cargo" => {
            let rest: Vec<&Word> = rest.collect();
            if rest.first().map(|w| w.text.as_str()) != Some("run") {
                return None;
            }
            match rest.iter().position(|w| w.text == "--") {
                Some(dash) => rest[dash + 1..].to_vec(),
                None => Vec::new(),
            }
        }
        _ => return None,
    };
    // `[-c FILE]` marks an optional part: the brackets are notation, not arguments.
    Some(
        args.into_iter()
            .map(|word| {
                if word.quoted {
                    word.text.clone()
                } else {
                    word.text.trim_matches(['[', ']']).to_owned()
                }
            })
            .filter(|arg| !arg.is_empty() && arg != "…")
            .collect(),
    )
}

/// The commands of a document: (line, the lines of output documented after it as `# …`).
fn documented_commands(text: &str) -> Vec<(String, Vec<String>)> {
    let mut commands: Vec<(String, Vec<String>)> = Vec::new();
    let mut in_shell = false;
    let mut fenced = false;
    let mut pending = String::new();
    for line in text.lines() {
        if let Some(info) = line.trim_start().strip_prefix("```") {
            in_shell = !fenced && matches!(info.trim(), "sh" | "bash" | "shell" | "");
            fenced = !fenced;
            continue;
        }
        if fenced && in_shell {
            if let Some(output) = line.strip_prefix("# ") {
                if let Some(last) = commands.last_mut() {
                    last.1.push(output.to_owned());
                }
                continue;
            }
            // A line ending in `\` goes on on the next one.
            if let Some(start) = line.strip_suffix('\\') {
                pending.push_str(start);
                continue;
            }
            let whole = std::mem::take(&mut pending) + line;
            if temma_args(&whole).is_some() {
                commands.push((whole, Vec::new()));
            }
        } else if !fenced {
            // Inline code in prose: `temma check -c etc/temma.toml`.
            for (i, span) in line.split('`').enumerate() {
                if i % 2 == 1 && (span.starts_with("temma ") || span.starts_with("cargo run")) {
                    commands.push((span.to_owned(), Vec::new()));
                }
            }
        }
    }
    commands
}

#[test]
fn every_documented_temma_command_parses() {
    let mut checked = 0;
    let mut failures = Vec::new();
    for document in DOCUMENTS {
        let text = std::fs::read_to_string(manifest_dir().join(document)).unwrap();
        for (line, _) in documented_commands(&text) {
            let Some(mut args) = temma_args(&line) else {
                continue;
            };
            // Parsing stops at `--help`: the subcommand and every flag before it must exist.
            args.push("--help".to_owned());
            let output = temma(&args.iter().map(String::as_str).collect::<Vec<_>>())
                .current_dir(manifest_dir())
                .output()
                .unwrap();
            checked += 1;
            if !output.status.success() {
                failures.push(format!(
                    "{document}: `{line}` → temma {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&output.stderr)
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The README's commands section alone has four: finding none means the parser broke.
    assert!(checked >= 15, "only {checked} commands found");
}

/// Whether `line` matches `pattern`, where `…` stands for any text.
fn matches(pattern: &str, line: &str) -> bool {
    let parts: Vec<&str> = pattern.split('…').collect();
    let mut rest = line;
    for (i, part) in parts.iter().enumerate() {
        if i == 0 {
            let Some(after) = rest.strip_prefix(part) else {
                return false;
            };
            rest = after;
        } else if i == parts.len() - 1 {
            return rest.ends_with(part);
        } else {
            let Some(at) = rest.find(part) else {
                return false;
            };
            rest = &rest[at + part.len()..];
        }
    }
    rest.is_empty()
}

#[test]
fn documented_outputs_are_what_temma_prints() {
    let mut checked = 0;
    let mut failures = Vec::new();
    for document in DOCUMENTS {
        let text = std::fs::read_to_string(manifest_dir().join(document)).unwrap();
        for (line, expected) in documented_commands(&text) {
            let args = temma_args(&line).unwrap();
            if expected.is_empty() || args.first().map(String::as_str) != Some("script") {
                continue;
            }
            let output = temma(&args.iter().map(String::as_str).collect::<Vec<_>>())
                .current_dir(manifest_dir())
                .output()
                .unwrap();
            checked += 1;
            let stdout = String::from_utf8_lossy(&output.stdout);
            let got: Vec<&str> = stdout.lines().collect();
            let same = got.len() == expected.len()
                && got
                    .iter()
                    .zip(&expected)
                    .all(|(line, pattern)| matches(pattern, line));
            if !same {
                failures.push(format!(
                    "{document}: `{line}`\nexpected:\n{}\ngot:\n{stdout}",
                    expected.join("\n")
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(checked >= 4, "only {checked} documented outputs found");
}

#[test]
fn the_shell_splitter_and_matcher_work() {
    let args =
        temma_args(r#"TEMMA_X__Y=1 temma script [SCRIPT] -m '{"a": "b c"}' [-p JSON]   # comment"#)
            .unwrap();
    assert_eq!(
        args,
        ["script", "SCRIPT", "-m", r#"{"a": "b c"}"#, "-p", "JSON"]
    );
    assert_eq!(
        temma_args("cargo run --release -- broker -c x &").unwrap(),
        ["broker", "-c", "x"]
    );
    assert_eq!(temma_args("cargo build --release"), None);
    assert_eq!(temma_args("ls temma"), None);
    assert!(matches(
        "passed: {…\"text\":\"****\"…}",
        r#"passed: {"a":1,"text":"****","t":2}"#
    ));
    assert!(!matches("passed: {…}", "dropped"));
    assert!(matches("dropped", "dropped"));
}

/// A count spelt as the documents spell it.
fn number_word(word: &str) -> Option<usize> {
    const WORDS: [&str; 21] = [
        "zero",
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven",
        "eight",
        "nine",
        "ten",
        "eleven",
        "twelve",
        "thirteen",
        "fourteen",
        "fifteen",
        "sixteen",
        "seventeen",
        "eighteen",
        "nineteen",
        "twenty",
    ];
    WORDS
        .iter()
        .position(|known| known.eq_ignore_ascii_case(word))
}

/// The README and `vendor/*/PATCHES.md` say how many changes temma makes to each patched
/// crate: as many as the patch list numbers.
#[test]
fn the_patch_counts_are_the_patch_lists() {
    let readme = std::fs::read_to_string(manifest_dir().join("README.md")).unwrap();
    for (krate, in_readme) in [
        ("zeromq", " small changes, each marked"),
        ("rhai", " change, "),
    ] {
        let list =
            std::fs::read_to_string(manifest_dir().join(format!("vendor/{krate}/PATCHES.md")))
                .unwrap();
        let numbered = list
            .lines()
            .filter(|line| {
                line.split_once(". **")
                    .is_some_and(|(number, _)| number.parse::<usize>().is_ok())
            })
            .count();
        // The README's count: the word before the phrase, in the paragraph naming the folder.
        let paragraph = readme
            .split("\n\n")
            .find(|paragraph| paragraph.contains(&format!("`vendor/{krate}`")))
            .unwrap_or_else(|| panic!("no README paragraph names vendor/{krate}"));
        let said = paragraph
            .split_once(in_readme)
            .and_then(|(before, _)| before.split_whitespace().last())
            .and_then(number_word)
            .unwrap_or_else(|| panic!("no count of {krate}'s changes in: {paragraph}"));
        assert_eq!(said, numbered, "README: {krate}'s changes");
        if numbered > 1 {
            // PATCHES.md's own opening says the count too.
            let opening = list.split("\n\n").take(2).collect::<Vec<_>>().join(" ");
            let spelt = opening
                .split_whitespace()
                .collect::<Vec<_>>()
                .windows(2)
                .find(|pair| pair[1] == "changes")
                .and_then(|pair| number_word(pair[0]));
            assert_eq!(spelt, Some(numbered), "vendor/{krate}/PATCHES.md's opening");
        }
    }
}
