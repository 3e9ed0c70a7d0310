//! The `wharf` executable: the built-in plugins plus the CLI.

fn main() {
    // Before anything else: what wharf inherited must not reach the programs it runs.
    wharf_core::program::close_inherited_on_exec();
    std::process::exit(wharf::cli::main(wharf::Registry::with_builtins()));
}
