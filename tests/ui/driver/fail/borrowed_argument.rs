use flowwire::prelude::*;

#[driver]
pub trait Mailer {
    async fn send(&self, to: &str) -> Result<(), String>;
}

fn main() {}
