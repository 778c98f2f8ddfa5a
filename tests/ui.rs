//! What a user sees for each misuse of the macros (`TRYBUILD=overwrite` regenerates the
//! `.stderr` files), and boards that must compile.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.compile_fail("tests/ui/*/fail/*.rs");
    t.pass("tests/ui/*/pass/*.rs");
}
