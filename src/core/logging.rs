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

/// At most one line per second from one call site; the lines held back
/// are counted in the next one. For faults that can repeat per connection
/// (EMFILE, refused handoffs): `warn_limited!("...", args)`.
#[macro_export]
macro_rules! warn_limited {
    ($($arg:tt)*) => {{
        thread_local! {
            static LAST: ::std::cell::Cell<(Option<::std::time::Instant>, u64)> =
                const { ::std::cell::Cell::new((None, 0)) };
        }
        LAST.with(|c| {
            let (last, held) = c.get();
            let now = ::std::time::Instant::now();
            if last.is_none_or(|t| now.duration_since(t) >= ::std::time::Duration::from_secs(1)) {
                if held > 0 {
                    log::warn!("{} ({held} more like this in the last second)", format_args!($($arg)*));
                } else {
                    log::warn!($($arg)*);
                }
                c.set((Some(now), 0));
            } else {
                c.set((last, held + 1));
            }
        });
    }};
}
