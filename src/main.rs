//! The `wharf` executable: the built-in plugins plus the CLI.

fn main() {
    std::process::exit(wharf::cli::main(wharf::Registry::with_builtins()));
}
