//! The `sakuga` binary: parses the command line and hands over to [`sakuga::cli`].

// glibc's allocator spends a sizeable share of a trivial job's CPU time (measured with
// perf on the gRPC bench: ~13% in malloc/free); mimalloc's thread-local heaps do not.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    sakuga::cli::main()
}
