//! The reference VMM. It does not boot anything yet: the crates it will compose are being
//! built first. Running it says so and exits with status 2.

fn main() {
    eprintln!(
        "vmm-reference: not built yet; it will boot Linux with the workspace crates \
         (see README.md, \"Status\")"
    );
    std::process::exit(2);
}
