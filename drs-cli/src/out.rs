//! Output to stdout. A closed pipe (`drs-cli status | head -1`) ends the program
//! quietly instead of panicking, as command-line users expect.

use std::io::Write;

/// Writes one line to stdout.
pub fn line(args: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{args}") {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("drs-cli: error: write output: {e}");
        std::process::exit(1);
    }
}

/// `println!` that survives a closed pipe.
macro_rules! say {
    ($($t:tt)*) => {
        $crate::out::line(format_args!($($t)*))
    };
}
pub(crate) use say;
