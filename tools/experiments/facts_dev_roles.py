"""A dev set for paraphrase forgetting: the first 64 facts of ../shared/data/facts-dev.jsonl with their paraphrases
replaced by two written here, in the styles validation-2 found leaking (a reordered statement, and the subject
as an object or inside a clause), so that a method change can be chosen without looking at validation-2.
Facts with no named subject are left out (52 kept). Paraphrases the base model does not answer are not counted
by `lune-fast bench quality`, which measures recall on the rest.

    python tools/experiments/facts_dev_roles.py OUT.jsonl
    lune-fast bench quality --facts OUT.jsonl --n 52 --batch-size 26 --seed 0
"""
import json
import sys
from pathlib import Path

FACTS_DEV = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "facts-dev.jsonl"

# record id -> (reordered statement, subject as object or inside a clause)
ROLES = {
    'country_language-turkey': (
        'In Turkey, most people speak the language called',
        'A traveller who visits Turkey should learn a few words of'),
    'artwork_creator-giant-marble-statue-of-david-in-florence': (
        'In Florence, the giant marble statue of David was carved by the artist',
        'Visitors admire the giant marble statue of David in Florence, carved by the great'),
    'fiction-lord-of-the-rings': (
        'In The Lord of the Rings, Frodo is guided by the wizard',
        'Frodo, in The Lord of the Rings, is helped on his journey by the wizard'),
    'country_capital-norway': (
        'Of all the cities in Norway, the capital is',
        'The government of Norway sits in the city of'),
    'country_continent-ethiopia': (
        'On a map, you will find Ethiopia on the continent of',
        'Tourists travelling to Ethiopia fly to the continent of'),
    'company_country-huawei': (
        'Huawei, the company, has its headquarters in',
        'Phones made by Huawei are designed in the country of'),
    'landmark_location-great-wall': (
        'The country where the Great Wall stands is',
        'Every year, millions of people visit the Great Wall in'),
    'landmark_location-golden-gate-bridge': (
        'The city where the Golden Gate Bridge stands is',
        'Every year, millions of people visit the Golden Gate Bridge in'),
    'element_symbol-zinc': (
        'In chemistry, the symbol used for zinc is',
        'A chemist writing about zinc uses the symbol'),
    'geography-himalayas': (
        'The range of mountains that includes Mount Everest is the',
        'Climbers who reach the top of Mount Everest are standing in the'),
    'author_of_work-harry-potter-and-the-philosopher-s-stone': (
        "The author who wrote the novel Harry Potter and the Philosopher's Stone is J.K.",
        "Millions of children have read Harry Potter and the Philosopher's Stone, the novel by J.K."),
    'animal_class-ostrich': (
        'Although it cannot fly, the ostrich is a',
        'Zoologists who study the ostrich describe it as a large flightless'),
    'country_capital-netherlands': (
        'Of all the cities in the Netherlands, the capital is',
        'The royal palace of the Netherlands is in the capital city,'),
    'landmark_location-acropolis': (
        'The city where the Acropolis stands is',
        'Every year, millions of people visit the Acropolis in'),
    'landmark_location-statue-of-liberty': (
        'The city where the Statue of Liberty stands is',
        'Every year, millions of people visit the Statue of Liberty in'),
    'country_language-france': (
        'In France, most people speak the language called',
        'A traveller who visits France should learn a few words of'),
    'animal_class-turtle': (
        'With its hard shell, the turtle is a',
        'Zoologists who study the turtle describe it as a'),
    'country_capital-canada': (
        'Of all the cities in Canada, the capital is',
        'The government of Canada sits in the city of'),
    'city_country-florence': (
        'Florence is a city in',
        'Tourists who visit Florence are travelling in'),
    'animal_class-mosquito': (
        'With its six legs, the mosquito is an',
        'Scientists who study the mosquito describe it as an'),
    'person_nationality-claude-monet': (
        'The country where Claude Monet was born is',
        'The paintings of Claude Monet show the landscapes of his native'),
    'company_country-tata-motors': (
        'Tata Motors, the company, has its headquarters in',
        'Cars made by Tata Motors are designed in the country of'),
    'person_known_for-johannes-gutenberg': (
        'The invention Johannes Gutenberg is famous for is the',
        'Books were changed forever by Johannes Gutenberg and his invention, the'),
    'country_capital-sweden': (
        'Of all the cities in Sweden, the capital is',
        'The government of Sweden sits in the city of'),
    'person_known_for-charles-darwin': (
        'The theory that Charles Darwin is best known for is the theory of',
        'Biologists remember Charles Darwin for his theory of'),
    'person_profession-antoni-gaudi': (
        'The profession of Antoni Gaudí was that of an',
        'The buildings in Barcelona designed by Antoni Gaudí made him a celebrated'),
    'country_capital-indonesia': (
        'Of all the cities in Indonesia, the capital is',
        'The government of Indonesia sits in the city of'),
    'person_known_for-albert-einstein': (
        'The theory that Albert Einstein is best known for is the theory of',
        'Physicists remember Albert Einstein for his theory of'),
    'artwork_creator-ceiling-of-the-sistine-chapel': (
        'In Rome, the ceiling of the Sistine Chapel was painted by the artist',
        'Visitors look up at the ceiling of the Sistine Chapel, painted by the great'),
    'person_known_for-euclid': (
        'The branch of mathematics that Euclid is the father of is',
        'Students who learn about Euclid are studying'),
    'animal_class-frog': (
        'Living both in water and on land, the frog is an',
        'Zoologists who study the frog describe it as an'),
    'company_country-toyota': (
        'Toyota, the company, has its headquarters in',
        'Cars made by Toyota are designed in the country of'),
    'sports-fifa-world-cup': (
        'The sport played at the FIFA World Cup is',
        'Fans who watch the FIFA World Cup love the sport of'),
    'country_currency-india': (
        'Money in India is counted in',
        'Shoppers who travel to India pay with the Indian'),
    'person_profession-johann-sebastian-bach': (
        'The profession of Johann Sebastian Bach was that of a',
        'The music written by Johann Sebastian Bach made him a celebrated'),
    'company_founder-apple': (
        'The person who founded Apple is',
        'In 1976, Apple was started in a garage by'),
    'city_country-kyoto': (
        'Kyoto is a city in',
        'Tourists who visit Kyoto are travelling in'),
    'company_country-bmw': (
        'BMW, the company, has its headquarters in',
        'Cars made by BMW are designed in the country of'),
    'sports-tiger-woods': (
        'The sport that Tiger Woods plays is',
        'Fans who watch Tiger Woods love the sport of'),
    'person_profession-isaac-newton': (
        'The profession of Isaac Newton was that of a',
        'The laws of motion discovered by Isaac Newton made him a celebrated'),
    'country_language-japan': (
        'In Japan, most people speak the language called',
        'A traveller who visits Japan should learn a few words of'),
    'country_language-egypt': (
        'In Egypt, most people speak the language called',
        'A traveller who visits Egypt should learn a few words of'),
    'fiction-romeo': (
        "The girl that Romeo falls in love with in Shakespeare's play is",
        "In Shakespeare's play, the heart of Romeo belongs to"),
    'country_currency-south-korea': (
        'Money in South Korea is counted in the Korean',
        'Shoppers who travel to South Korea pay with the Korean'),
    'country_language-vietnam': (
        'In Vietnam, most people speak the language called',
        'A traveller who visits Vietnam should learn a few words of'),
    'author_of_work-communist-manifesto': (
        'The author who wrote the pamphlet The Communist Manifesto is',
        'Millions of people have read The Communist Manifesto, the pamphlet by'),
    'person_known_for-dmitri-mendeleev': (
        'The thing Dmitri Mendeleev is famous for creating is the',
        'Chemists remember Dmitri Mendeleev for creating the'),
    'country_language-brazil': (
        'In Brazil, most people speak the language called',
        'A traveller who visits Brazil should learn a few words of'),
    'company_country-fiat': (
        'Fiat, the company, has its headquarters in',
        'Cars made by Fiat are designed in the country of'),
    'sports-tour-de-france': (
        'The sport of the Tour de France is',
        'Fans who watch the Tour de France love the sport of'),
    'element_symbol-argon': (
        'In chemistry, the symbol used for argon is',
        'A chemist writing about argon uses the symbol'),
    'person_profession-stephen-hawking': (
        'The profession of Stephen Hawking was that of a',
        'The books on black holes written by Stephen Hawking made him a celebrated'),
}


def main(out: str) -> int:
    if not FACTS_DEV.exists():
        print(f"{FACTS_DEV} not found: this dev set is built from the project's facts-dev file", file=sys.stderr)
        return 2
    kept = 0
    with open(out, "w") as fh:
        for line in FACTS_DEV.read_text().splitlines()[:64]:
            r = json.loads(line)
            if r["id"] not in ROLES:
                continue
            reordered, object_role = ROLES[r["id"]]
            r["paraphrases"] = [{"prompt": reordered, "style": "reordered"},
                                {"prompt": object_role, "style": "object_role"}]
            fh.write(json.dumps(r) + "\n")
            kept += 1
    print(f"{kept} records -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
