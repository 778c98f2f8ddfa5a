use flowwire::prelude::*;

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct V1;
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct V2;
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct V3;

fn one(_: V1) -> V2 {
    V2
}
fn two(_: V2) -> V3 {
    V3
}

#[flow(version = 2, migrate = [one, two])]
pub struct Doc {
    #[link]
    state: V3,
}

#[flow]
impl Doc {
    #[wire]
    fn run(&mut self) -> Command<Self> {
        Command::finish()
    }
}

fn main() {}
