//! `--answer-rule reference` (src/answer.rs) against what the LIFT release's
//! scripts compute, worked out by hand from their Python:
//!   AQuA:        re.findall(r'A|B|C|D|E', text.strip())[0] == answer
//!   commonsense: re.findall(r'true|false', text.lower())[0] == answer.lower()
//!                (solution1|solution2, answer1|...|answer5, ending1|...|ending4,
//!                option1|option2 for the other sets)
//!   numbers:     float(re.findall(r'-?\d+\.?\d*', text.replace(',', ''))[-1])
//!                within 1e-3 of float(answer)
//! and, on the real data sets, that reading the family from the gold answer
//! (as lift does) picks the family the release picks by data set name.

mod common;

use lift::answer::{self, AnswerKind, Rule};

fn both(text: &str, gold: &str) -> (bool, bool) {
    (answer::is_correct_by(Rule::Lift, text, gold), answer::is_correct_by(Rule::Reference, text, gold))
}

#[test]
fn letters_the_first_capital_a_to_e_anywhere() {
    // (text, gold, lift says correct, the release says correct)
    let cases = [
        ("Answer: C", "C", true, false), // the release reads the A of "Answer"
        ("Answer: C", "A", false, true),
        ("The answer is (B).", "B", true, true),
        ("Dogs bark, so the answer is (A).", "A", true, false), // D of "Dogs"
        ("  E is right", "E", true, true),
        ("no capital letters here", "A", false, false),
    ];
    for (text, gold, lift, reference) in cases {
        assert_eq!(both(text, gold), (lift, reference), "{text:?} gold {gold}");
    }
    assert_eq!(answer::reference_letter("xx Bx"), Some('B'));
    assert_eq!(answer::extract_by(Rule::Reference, "Answer: C", AnswerKind::Letter).as_deref(), Some("A"));
}

#[test]
fn option_words_the_first_one_as_a_substring_of_the_lowercased_text() {
    let cases = [
        ("That is untrue.", "true", false, true), // "untrue" contains "true"
        ("That is untrue.", "false", false, false),
        ("TRUE, and not false", "true", true, true),
        ("solution2solution1", "solution2", false, true), // not whole words
        ("I pick Answer3 over answer1", "answer3", true, true),
        ("option1", "Option1", true, true), // the gold is lowercased too
        ("the best ending is ending4", "ending4", true, true),
        ("nothing", "option2", false, false),
    ];
    for (text, gold, lift, reference) in cases {
        assert_eq!(both(text, gold), (lift, reference), "{text:?} gold {gold}");
    }
}

#[test]
fn numbers_are_read_alike() {
    for (text, gold, want) in [
        ("The answer is 1,234.5.", "1234.5", true),
        ("3 apples and 4 pears: 7", "7", true),
        ("It is -2.", "-2", true),
        ("It is 72.", "72.0004", true),
        ("It is 72.", "72.002", false),
        ("none", "0", false),
    ] {
        assert_eq!(both(text, gold), (want, want), "{text:?} gold {gold}");
    }
}

/// The release picks a family by data set name; lift by the gold answer. On
/// every example of the public sets the two agree.
#[test]
fn gold_answers_pick_the_family_the_release_picks_by_name() {
    let root = common::root().join("../shared/datasets");
    let families: [(&str, &[&str]); 7] = [
        ("commonsense/boolq_test.json", &["true", "false"]),
        ("commonsense/piqa_test.json", &["solution1", "solution2"]),
        ("commonsense/social_i_qa_test.json", &["answer1", "answer2", "answer3", "answer4", "answer5"]),
        ("commonsense/ARC-Easy_test.json", &["answer1", "answer2", "answer3", "answer4", "answer5"]),
        ("commonsense/ARC-Challenge_test.json", &["answer1", "answer2", "answer3", "answer4", "answer5"]),
        ("commonsense/openbookqa_test.json", &["answer1", "answer2", "answer3", "answer4", "answer5"]),
        ("commonsense/winogrande_test.json", &["option1", "option2"]),
    ];
    let mut checked = 0;
    for (file, family) in families {
        let path = root.join(file);
        if !path.exists() {
            eprintln!("NOT RUN for {}: missing", path.display());
            continue;
        }
        let loaded = lift::data::load(&path, lift::data::Purpose::Eval, false).unwrap();
        for e in &loaded.examples {
            let gold = e.answer.as_deref().unwrap();
            assert_eq!(answer::answer_kind(gold), AnswerKind::Choice(family), "{file}: {gold}");
            checked += 1;
        }
    }
    for (file, kind) in [("math/AQuA_test.json", AnswerKind::Letter), ("math/gsm8k_test.json", AnswerKind::Number)] {
        let path = root.join(file);
        if let Ok(loaded) = lift::data::load(&path, lift::data::Purpose::Eval, false) {
            for e in &loaded.examples {
                assert_eq!(answer::answer_kind(e.answer.as_deref().unwrap()), kind, "{file}");
                checked += 1;
            }
        }
    }
    println!("{checked} gold answers checked");
}
