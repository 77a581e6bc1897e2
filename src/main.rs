//! The `sakuga` binary: parses the command line and hands over to [`sakuga::cli`].

fn main() -> std::process::ExitCode {
    sakuga::cli::main()
}
