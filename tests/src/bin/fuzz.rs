//! The long run of the agent's protocol fuzz targets (`tokenfleet_agent::fuzz`): the suite runs
//! each target for a few seconds; this runs them for as long as asked, in release, and keeps what
//! it finds. Not a test; run it by hand:
//!
//! ```text
//! cargo run --release -p tokenfleet-testkit --bin fuzz -- --list
//! cargo run --release -p tokenfleet-testkit --bin fuzz -- --target smtp_data --secs 180
//! cargo run --release -p tokenfleet-testkit --bin fuzz -- --target all --secs 120 --save-corpus
//! ```
//!
//! A failing input (a panic or a failed property) is written to
//! `agent/tests/fuzz/regressions/<target>/crash-<hash>`, where the suite replays it on every run
//! (so fix the parser, then keep the file as the regression test). With `--save-corpus`, up to
//! `--keep` inputs that showed a new behaviour are added to `agent/tests/fuzz/corpus/<target>/`.
//! Exit status 1 when anything failed.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use tokenfleet_agent::fuzz::{self, Budget, Target};

#[derive(Parser, Debug)]
#[command(about = "Fuzz the agent's protocol parsers (long runs of the suite's fuzz targets)")]
struct Args {
    /// Target name, or `all`.
    #[arg(long, default_value = "all")]
    target: String,
    /// Seconds per target.
    #[arg(long, default_value_t = 60)]
    secs: u64,
    /// Mutator seed (default: from the clock; printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Longest input generated, in bytes.
    #[arg(long, default_value_t = 64 * 1024)]
    max_len: usize,
    /// Add inputs with a new behaviour to the corpus directory.
    #[arg(long)]
    save_corpus: bool,
    /// At most this many new corpus files per target.
    #[arg(long, default_value_t = 20)]
    keep: usize,
    /// List the targets and exit.
    #[arg(long)]
    list: bool,
}

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/tests/fuzz")
}

fn read_dir(dir: &Path) -> Vec<Vec<u8>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| !n.to_string_lossy().starts_with('.'))
        })
        .collect();
    paths.sort();
    paths.iter().filter_map(|p| std::fs::read(p).ok()).collect()
}

fn name_of(input: &[u8]) -> String {
    let mut h = DefaultHasher::new();
    input.hash(&mut h);
    format!("{:016x}", h.finish())
}

fn run(target: &Target, args: &Args, seed: u64) -> anyhow::Result<bool> {
    let corpus_dir = fuzz_dir().join("corpus").join(target.name);
    let crash_dir = fuzz_dir().join("regressions").join(target.name);
    let mut seeds = read_dir(&corpus_dir);
    seeds.extend(read_dir(&crash_dir));
    let report = {
        let _quiet = fuzz::quiet_panics();
        fuzz::fuzz(
            target,
            &seeds,
            Budget {
                time: Duration::from_secs(args.secs),
                seed,
                max_len: args.max_len,
                ..Budget::default()
            },
        )
    };
    let rate = report.executions as f64 / report.elapsed.as_secs_f64().max(0.001);
    println!(
        "{:<14} {:>11} inputs in {:>6.1} s ({rate:>9.0}/s), {:>5} behaviours, pool {:>5}, {} failure(s)",
        target.name,
        report.executions,
        report.elapsed.as_secs_f64(),
        report.signatures,
        report.pool,
        report.crashes.len()
    );
    for crash in &report.crashes {
        std::fs::create_dir_all(&crash_dir)?;
        let path = crash_dir.join(format!("crash-{}", name_of(&crash.input)));
        std::fs::write(&path, &crash.input)?;
        println!(
            "  FAILED: {}\n    input saved as {}",
            crash.message,
            path.display()
        );
    }
    if args.save_corpus {
        std::fs::create_dir_all(&corpus_dir)?;
        let mut kept = 0;
        for input in report.discovered.iter().filter(|i| i.len() <= 4096) {
            if kept == args.keep {
                break;
            }
            std::fs::write(corpus_dir.join(format!("found-{}", name_of(input))), input)?;
            kept += 1;
        }
        println!("  {kept} new corpus file(s) in {}", corpus_dir.display());
    }
    Ok(report.crashes.is_empty())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.list {
        for t in fuzz::TARGETS {
            println!("{:<14} {}", t.name, t.about);
        }
        return Ok(());
    }
    let targets: Vec<&Target> = if args.target == "all" {
        fuzz::TARGETS.iter().collect()
    } else {
        match fuzz::target(&args.target) {
            Some(t) => vec![t],
            None => anyhow::bail!("--target {}: no such target (see --list)", args.target),
        }
    };
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    println!("seed {seed}, {} s per target", args.secs);
    let mut ok = true;
    for t in targets {
        ok &= run(t, &args, seed)?;
    }
    if !ok {
        std::process::exit(1);
    }
    Ok(())
}
