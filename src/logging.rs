//! Log set-up shared by every subcommand: one line per event on stderr.
use log::LevelFilter;
use simplelog::{ColorChoice, ConfigBuilder, TermLogger, TerminalMode};

/// `verbose` counts `-v` flags (info -> debug -> trace); `level`, when
/// given, wins. `tag` prefixes every line (e.g. "7000" or "worker 1").
pub fn init(verbose: u8, level: Option<LevelFilter>) {
    let level = level.unwrap_or(match verbose {
        0 => LevelFilter::Info,
        1 => LevelFilter::Debug,
        _ => LevelFilter::Trace,
    });
    let config = ConfigBuilder::new()
        .set_target_level(LevelFilter::Off)
        .set_thread_level(LevelFilter::Off)
        .set_location_level(LevelFilter::Off)
        .set_time_format_rfc3339()
        .build();
    let _ = TermLogger::init(level, config, TerminalMode::Stderr, ColorChoice::Never);
}
