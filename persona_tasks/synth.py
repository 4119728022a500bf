"""Deterministic synthetic behaviour logs with planted personas.

Used by the memories benchmark (``bench/bench_memories.py``), by clustering tests and benchmarks, and by the
evaluation (ARI/NMI of recovered personas against the planted ones).

The model, in one paragraph: there are ``len(TOPICS)`` persona topics (home espresso, marathon training, ...),
each with three product categories, every category with realistic search queries and branded items with a
price range. Every user gets 1-4 planted personas (distinct topics, Dirichlet weights). Every session belongs
to exactly one persona of its user (the first sessions of a user cover all of their personas, later ones are
drawn by weight) and mostly to one category of it; a small share of actions (``noise``) is drawn from any
topic. Inside a session actions follow a small Markov chain (search first, then clicks / views / likes and
refining searches); some sessions end in ``view -> cart`` or ``view -> cart -> purchase`` of the same item.
Gaps inside a session are 2 s .. 15 min; sessions of a user are at least ``MIN_SESSION_GAP_S`` (40 min) apart
and never span a UTC midnight, so the sessions rule of docs/ARCHITECTURE.md (gap > 30 min, or midnight)
recovers the planted sessions exactly. A user's timestamps are distinct, so no two events share an event_id.

Everything is vectorised with numpy (the only Python loops run over topics or over positions inside a
session), and a given seed always gives the same frame. One million events take under a second on one core.

Public API::

    generate_events(n_events, n_users=None, seed=0, days=7, start="2026-01-01", noise=0.02) -> pl.DataFrame
    write_events(df, path)                                    # Parquet
    generate_memories(n_users, memories_per_user, seed=0)    -> pl.DataFrame  (memory_text like the dbt mart)
    memory_text(parts_expr, max_chars), action_part(type_expr, text_expr)   # polars helpers of that format
    embedding_text(type_expr, text_expr, max_chars)                         # the mart's embedding_text
    TOPICS, TOPIC_KEYS, EVENT_TYPES, ACTION_VERBS, EVENTS_MAPPING_ATTRIBUTES

``generate_events`` columns: ``user_id, event_ts, event_type, item_id, text`` (the generic ``events`` ingest
format's default mapping), ``category, brand, price`` (map them into ``attributes`` with
``EventsMapping(attributes=["category", "brand", "price"])``, i.e. ``[ingest.events] attributes = [...]``), and
the ground truth ``planted_persona`` (topic key), ``planted_session`` (int, unique over the frame) and
``planted_noise`` (bool: the action was drawn from a random topic).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import numpy as np
import polars as pl

__all__ = [
    "ACTION_VERBS",
    "EVENTS_MAPPING_ATTRIBUTES",
    "EVENT_TYPES",
    "MAX_INTRA_SESSION_GAP_S",
    "MIN_SESSION_GAP_S",
    "TOPICS",
    "TOPIC_KEYS",
    "Category",
    "Topic",
    "action_part",
    "embedding_text",
    "generate_events",
    "generate_memories",
    "memory_text",
    "write_events",
]

# --------------------------------------------------------------------------------------------------------------
# Topics. Each category: (name, (price_lo, price_hi), items, queries) where items is
# "Brand A, Brand B: noun 1, noun 2 / Brand C: noun 3" (every brand of a group with every noun of it; the item
# title is "<brand> <noun>") and queries are separated by "; ".
# --------------------------------------------------------------------------------------------------------------
_RAW_TOPICS: dict[str, tuple[str, list[tuple[str, tuple[float, float], str, str]]]] = {
    "home_espresso": ("Home espresso", [
        ("espresso machines", (250, 2400),
         "Breville, Gaggia, Lelit, Rancilio: espresso machine, dual boiler espresso machine / "
         "De'Longhi: Dedica espresso maker, La Specialista espresso machine",
         "best espresso machine under 1000; breville barista express vs gaggia classic pro; "
         "dual boiler vs heat exchanger espresso; how to descale an espresso machine; gaggia classic pro opv mod"),
        ("coffee grinders", (90, 900),
         "Baratza, Eureka, Niche, Fellow: burr grinder, single dose grinder / Timemore, 1Zpresso: hand grinder",
         "best grinder for espresso; niche zero vs eureka mignon; espresso grind size too fine; "
         "hand grinder for espresso; grinder retention single dosing"),
        ("espresso accessories", (12, 250),
         "Normcore: espresso tamper, wdt tool, bottomless portafilter 58mm / Acaia, Timemore: coffee scale with "
         "timer / Fellow, Rhinowares: milk frothing pitcher",
         "wdt tool espresso channeling; espresso ratio 1:2 brew time; latte art milk steaming tips; "
         "bottomless portafilter 58mm; puck screen worth it"),
    ]),
    "marathon_training": ("Marathon training", [
        ("running shoes", (110, 280),
         "Nike, Hoka, Brooks, Asics, Saucony: carbon plate racing shoe, daily trainer running shoe",
         "best marathon racing shoes; hoka clifton vs brooks ghost; carbon plate shoes for beginners; "
         "when to replace running shoes; wide toe box running shoes"),
        ("gps watches", (80, 700),
         "Garmin, Coros, Polar, Suunto: gps running watch / Garmin, Polar: heart rate chest strap",
         "garmin forerunner 265 vs coros pace 3; best gps watch for marathon training; zone 2 heart rate training; "
         "chest strap vs wrist heart rate accuracy"),
        ("race nutrition", (12, 60),
         "Maurten, GU, SiS, Precision Fuel: energy gel 12 pack, electrolyte drink mix",
         "how many gels during a marathon; carb loading before a marathon; 16 week marathon training plan; "
         "sub 4 hour marathon pace chart; long run fueling strategy"),
    ]),
    "toddler_parenting": ("Toddler parenting", [
        ("toddler sleep", (20, 90),
         "Hatch: Rest sleep trainer clock, sound machine / Yogasleep: white noise machine / "
         "Gro: toddler sleep bag, ok to wake clock",
         "toddler sleep regression 2 years; toddler waking up at 5am; ok to wake clock for toddlers; "
         "transition from crib to toddler bed; toddler nap schedule 18 months"),
        ("potty training", (10, 45),
         "Summer Infant, BabyBjorn, Munchkin: potty chair, potty training seat / Pull-Ups: training pants 3t-4t",
         "potty training in 3 days method; toddler refuses to poop on potty; potty training regression; "
         "night time potty training age"),
        ("toddler meals and toys", (8, 120),
         "Munchkin, OXO Tot: toddler snack cup, toddler plate and utensil set / "
         "Melissa & Doug, Lovevery: wooden puzzle set, montessori play kit",
         "picky eater toddler meal ideas; healthy snacks for 2 year olds; montessori toys for 2 year olds; "
         "how to handle toddler tantrums; toddler screen time guidelines"),
    ]),
    "indie_game_dev": ("Indie game development", [
        ("game assets", (5, 60),
         "Kenney, GameDev Market, Unity Asset Store: pixel art tileset, 2d platformer asset pack, retro sfx pack",
         "godot vs unity for 2d games; godot 4 tilemap tutorial; pixel art character walk cycle; "
         "free game assets commercial use; game jam ideas 48 hours"),
        ("drawing tablets", (60, 600),
         "Wacom, XP-Pen, Huion: drawing tablet, 16 inch pen display",
         "best drawing tablet for pixel art; wacom intuos vs xp-pen deco; pen display for game art; "
         "aseprite animation tutorial"),
        ("game dev books", (15, 60),
         "No Starch Press, O'Reilly, Packt: game programming patterns book, godot 4 game development book, "
         "shader programming book",
         "how to market an indie game on steam; steam wishlists before launch; "
         "game programming patterns state machine; shader tutorial for beginners; indie game devlog"),
    ]),
    "vintage_watches": ("Vintage watches", [
        ("vintage watches", (400, 9000),
         "Omega: Seamaster 1960s automatic, Speedmaster Professional / Seiko: 6139 chronograph, 62MAS diver / "
         "Rolex: Oyster Perpetual 1002, Datejust 1601 / Longines: Conquest 1970s automatic",
         "vintage omega seamaster price guide; how to spot a fake vintage rolex; seiko 6139 pogue value; "
         "tropical dial meaning; vintage watch service cost"),
        ("watch straps", (20, 180),
         "Hirsch, Barton, Erika's Originals: leather watch strap 20mm, nato strap, tropic rubber strap",
         "best straps for vintage divers; 19mm vs 20mm lug width; bund strap vintage look; "
         "how to change spring bars"),
        ("watch tools and care", (10, 200),
         "Bergeon: spring bar tool, case back opener / Wolf: automatic watch winder, watch roll travel case",
         "automatic watch winder worth it; how often to service a mechanical watch; demagnetize a watch; "
         "watch collecting for beginners"),
    ]),
    "vegan_cooking": ("Vegan cooking", [
        ("plant-based pantry", (3, 30),
         "Bob's Red Mill, Anthony's, Frontier Co-op: nutritional yeast, textured vegetable protein, "
         "vital wheat gluten, kala namak black salt",
         "how to make seitan at home; vegan protein sources list; nutritional yeast uses; "
         "vegan egg substitute for baking; vegan meal prep high protein"),
        ("vegan cookbooks", (15, 40),
         "Isa Chandra Moskowitz, Nisha Vora, Bosh!: vegan cookbook, plant based meal prep cookbook",
         "best vegan cookbooks 2026; easy vegan dinner recipes; vegan chili recipe; cashew cream sauce recipe"),
        ("kitchen appliances", (40, 500),
         "Vitamix, Ninja: high speed blender, food processor / Instant Pot: multicooker, air fryer lid",
         "vitamix vs ninja blender; instant pot vegan recipes; cashew cheese without a vitamix; "
         "tofu press worth it"),
    ]),
    "vegetable_gardening": ("Vegetable gardening", [
        ("seeds and bulbs", (3, 25),
         "Burpee, Johnny's Seeds, Baker Creek: heirloom tomato seeds, pepper seed collection, lettuce seed mix, "
         "garlic bulbs for planting",
         "when to start tomato seeds indoors; heirloom vs hybrid tomatoes; companion planting chart; "
         "last frost date zone 6"),
        ("raised beds and soil", (20, 300),
         "Vego Garden, Greenes Fence: raised garden bed kit, metal raised bed / "
         "Espoma, FoxFarm: organic garden soil, tomato fertilizer",
         "raised bed soil mix ratio; metal vs wood raised beds; how deep should a raised bed be; "
         "organic fertilizer for tomatoes"),
        ("garden tools", (15, 120),
         "Fiskars, Felco: pruning shears, garden hoe / Gardena, Dramm: drip irrigation kit, watering wand",
         "drip irrigation for raised beds; how to prune tomato suckers; best pruning shears; "
         "blossom end rot fix; squash vine borer prevention"),
    ]),
    "road_cycling": ("Road cycling", [
        ("road bikes", (900, 6000),
         "Specialized, Trek, Canyon, Cannondale: carbon road bike, endurance road bike, gravel bike",
         "best endurance road bike 2026; canyon endurace vs trek domane; carbon vs aluminium road bike; "
         "road bike size chart"),
        ("cycling computers and power", (50, 900),
         "Garmin, Wahoo, Hammerhead: bike computer / Favero, Stages: power meter pedals, crank power meter / "
         "Wahoo: smart trainer",
         "wahoo elemnt bolt vs garmin edge 540; ftp test how to; power meter worth it for beginners; "
         "zwift smart trainer setup"),
        ("cycling apparel", (30, 250),
         "Rapha, Castelli, Assos: bib shorts, cycling jersey, winter cycling jacket / Giro, Kask: road helmet",
         "bib shorts vs shorts; cycling saddle sore prevention; how to dress for winter cycling; "
         "tubeless road tires setup"),
    ]),
    "pc_building": ("PC building", [
        ("graphics cards", (300, 2000),
         "ASUS, MSI, Gigabyte: GeForce RTX 5070 graphics card, GeForce RTX 5080 graphics card / "
         "Sapphire, XFX: Radeon RX 9070 XT graphics card",
         "rtx 5070 vs rx 9070 xt; best gpu for 1440p gaming; gpu prices dropping; 12vhpwr cable melting"),
        ("cpus and motherboards", (120, 600),
         "AMD: Ryzen 7 9800X3D processor, Ryzen 5 9600X processor / Intel: Core Ultra 7 265K processor / "
         "ASUS, MSI, Gigabyte: B650 motherboard, X870 motherboard",
         "9800x3d vs 7800x3d; best b650 motherboard; how to update bios without a cpu; "
         "ddr5 6000 cl30 vs ddr5 6400"),
        ("pc cases and cooling", (60, 250),
         "Fractal Design, Lian Li, NZXT: mid tower case, 360mm aio cooler / Noctua, be quiet!: tower air cooler",
         "air cooler vs aio; best airflow pc case; pc build guide 2026; how to apply thermal paste; "
         "pc won't post troubleshooting"),
    ]),
    "budget_travel": ("Budget travel", [
        ("luggage", (40, 350),
         "Osprey, Cabin Zero, Samsonite: carry-on backpack 40l, hard shell carry-on suitcase, packing cubes set",
         "best carry on backpack 40l; ryanair cabin bag size; one bag travel packing list; "
         "packing cubes worth it"),
        ("travel gear", (10, 80),
         "Anker, Ugreen: universal travel adapter, power bank 20000mah / "
         "Sea to Summit, Cocoon: quick dry travel towel, silk sleeping bag liner",
         "universal travel adapter europe; power bank carry on rules; hostel packing essentials; "
         "travel towel quick dry"),
        ("travel guides", (12, 35),
         "Lonely Planet, Rick Steves, Rough Guides: Europe on a shoestring guide, Portugal travel guide, "
         "Japan travel guide",
         "cheap flights to lisbon; interrail pass worth it; 2 weeks in europe itinerary budget; "
         "cheap hostels in barcelona; japan rail pass price"),
    ]),
    "puppy_training": ("Puppy training", [
        ("dog training gear", (8, 90),
         "Kong, Ruffwear, PetSafe, Halti: no pull dog harness, training treat pouch, dog clicker, long line leash",
         "how to stop puppy biting; loose leash walking tips; crate training puppy at night; "
         "clicker training basics; puppy socialization checklist"),
        ("dog food and treats", (10, 90),
         "Purina Pro Plan, Royal Canin, Hill's Science Diet: puppy dry food 15 lb, puppy training treats / "
         "Greenies, Zuke's: dental chews",
         "how much to feed a puppy; best puppy food large breed; grain free dog food heart; puppy teething chews"),
        ("crates and beds", (30, 200),
         "MidWest, Furhaven, Diggs: dog crate 36 inch, orthopedic dog bed, crate divider panel",
         "crate size for golden retriever puppy; puppy crying in crate; best indestructible dog bed; "
         "how long can a puppy stay in a crate"),
    ]),
    "home_gym": ("Home gym strength training", [
        ("home gym equipment", (150, 1500),
         "Rogue, REP Fitness, Titan: power rack, adjustable bench, olympic barbell, bumper plate set",
         "best power rack for garage gym; rep pr-4000 vs rogue r-3; garage gym flooring; olympic barbell knurling"),
        ("dumbbells and accessories", (20, 450),
         "Bowflex, PowerBlock, NordicTrack: adjustable dumbbells / Rogue, Harbinger, Iron Bull: lifting belt, "
         "wrist wraps, resistance bands set",
         "powerblock vs bowflex dumbbells; when to use a lifting belt; best resistance bands for strength"),
        ("supplements", (20, 60),
         "Optimum Nutrition, Transparent Labs, Myprotein, Thorne: whey protein 5 lb, creatine monohydrate, "
         "pre-workout powder",
         "how much protein to build muscle; creatine loading phase needed; 5x5 stronglifts program; "
         "progressive overload explained; beginner full body workout 3 days"),
    ]),
    "mirrorless_photography": ("Mirrorless photography", [
        ("mirrorless cameras", (600, 3000),
         "Sony: a7 IV mirrorless camera, a6700 mirrorless camera / Fujifilm: X-T5 mirrorless camera, "
         "X100VI compact camera / Canon: EOS R6 Mark II camera / Nikon: Z6 III camera",
         "sony a7 iv vs canon r6 ii; best mirrorless camera for beginners; fujifilm film simulation recipes; "
         "full frame vs aps-c"),
        ("camera lenses", (200, 2000),
         "Sigma, Tamron, Sony, Viltrox: 35mm f1.4 prime lens, 24-70mm f2.8 zoom lens, 85mm f1.8 portrait lens",
         "best portrait lens for sony; sigma 24-70 vs tamron 28-75; prime vs zoom for street photography; "
         "lens for astrophotography"),
        ("camera accessories", (15, 300),
         "Peak Design: camera sling, travel tripod, slide camera strap / SanDisk: 128gb sd card / "
         "K&F Concept: variable nd filter",
         "exposure triangle explained; long exposure without nd filter; lightroom editing workflow; "
         "street photography settings; best sd card for 4k video"),
    ]),
    "sourdough_baking": ("Sourdough baking", [
        ("bread baking tools", (10, 120),
         "Lodge, Challenger Breadware: cast iron dutch oven, bread pan / "
         "Bakerfully, Fante's: banneton proofing basket, bread lame, dough scraper",
         "how to score sourdough; dutch oven bread baking temperature; banneton rice flour; open crumb sourdough"),
        ("flour and starter", (5, 40),
         "King Arthur, Bob's Red Mill, Central Milling: bread flour 5 lb, whole wheat flour, rye flour, "
         "dried sourdough starter",
         "how to make sourdough starter from scratch; starter not rising; bread flour vs all purpose; "
         "hydration percentage explained"),
        ("baking appliances", (30, 400),
         "KitchenAid, Ankarsrum: stand mixer, dough mixer / Brod & Taylor: folding proofer, sourdough home",
         "bulk fermentation how long; sourdough discard recipes; cold retard overnight; "
         "overproofed vs underproofed sourdough"),
    ]),
    "planted_aquarium": ("Planted aquariums", [
        ("aquarium tanks and filters", (40, 600),
         "Fluval, UNS, ADA, Waterbox: rimless aquarium 20 gallon, canister filter, nano cube tank",
         "how to cycle a fish tank; best canister filter for planted tank; rimless tank stand; "
         "fishless nitrogen cycle"),
        ("aquarium lighting and co2", (30, 400),
         "Chihiros, Fluval, Week Aqua, Twinstar: planted aquarium led light / CO2Art, GLA: co2 regulator kit",
         "co2 injection planted tank beginner; how long to run aquarium lights; algae outbreak after co2; "
         "drop checker color"),
        ("aquascaping plants and hardscape", (5, 80),
         "Tropica, Dennerle: java fern tissue culture, monte carlo carpet plant / "
         "ADA, Aquarium Co-Op: aquasoil 9l, dragon stone hardscape",
         "dutch aquascape vs nature aquarium; best beginner aquarium plants; neocaridina shrimp tank setup; "
         "easy green fertilizer dosing"),
    ]),
    "backpacking": ("Backpacking and hiking", [
        ("tents and shelters", (150, 700),
         "Big Agnes, Zpacks, Durston, Nemo: ultralight tent 2 person, trekking pole tent",
         "best ultralight tent 2026; durston x-mid vs zpacks duplex; how to pitch a trekking pole tent; "
         "condensation in single wall tent"),
        ("sleeping systems", (80, 500),
         "Therm-a-Rest, Nemo, Sea to Summit: sleeping pad, inflatable pillow / "
         "Enlightened Equipment, Hammock Gear: down quilt 20 degree",
         "sleeping pad r value explained; quilt vs sleeping bag; down vs synthetic insulation; cold camping tips"),
        ("packs and navigation", (20, 350),
         "Osprey, Gregory, Hyperlite: backpacking pack 55l / Garmin: inReach Mini satellite communicator / "
         "Black Diamond: trekking poles, headlamp",
         "lighterpack base weight list; john muir trail permits; how much water to carry hiking; "
         "bear canister requirements; garmin inreach subscription cost"),
    ]),
    "skincare_routine": ("Skincare routine", [
        ("cleansers and moisturizers", (8, 45),
         "CeraVe, La Roche-Posay, Cetaphil, Vanicream: hydrating cleanser, moisturizing cream, "
         "gentle foaming cleanser",
         "best moisturizer for dry skin; cerave vs la roche posay; skincare routine order; "
         "double cleansing explained"),
        ("serums and actives", (8, 90),
         "The Ordinary, Paula's Choice, Naturium: niacinamide serum, retinol 0.5% serum, vitamin c serum, "
         "2% bha exfoliant",
         "retinol purging how long; niacinamide and vitamin c together; bha vs aha for blackheads; "
         "retinol for beginners"),
        ("sunscreen", (10, 45),
         "La Roche-Posay, Supergoop!, Beauty of Joseon, EltaMD: spf 50 sunscreen, tinted mineral sunscreen",
         "best sunscreen for oily skin; mineral vs chemical sunscreen; korean sunscreen no white cast; "
         "how much sunscreen for face"),
    ]),
    "mechanical_keyboards": ("Mechanical keyboards", [
        ("keyboards", (70, 400),
         "Keychron, Wooting, Mode Designs, NuPhy: 75% mechanical keyboard, hot-swappable keyboard kit, "
         "low profile keyboard",
         "keychron q1 vs k2; best 75 percent keyboard; hot swap vs soldered; wooting rapid trigger explained"),
        ("keyboard switches", (15, 60),
         "Gateron, Cherry, Akko, Kailh: linear switches 70 pack, tactile switches 70 pack, silent switches",
         "linear vs tactile switches; how to lube switches; gateron oil king review; thocky keyboard build"),
        ("keycaps and mods", (10, 150),
         "GMK, Akko, Drop: pbt keycap set, cherry profile keycaps / Glorious, Durock: switch lube station, "
         "screw-in stabilizers",
         "pbt vs abs keycaps; tape mod keyboard; how to fix stabilizer rattle; custom keyboard build guide"),
    ]),
    "wedding_planning": ("Wedding planning", [
        ("wedding attire", (100, 2500),
         "David's Bridal, Azazie, BHLDN, Allure: a-line wedding dress, bridesmaid dress, cathedral wedding veil",
         "wedding dress styles for body type; bridesmaid dress color trends; how early to buy a wedding dress; "
         "wedding dress alterations cost"),
        ("wedding stationery and decor", (20, 300),
         "Minted, Zola, Shutterfly: wedding invitation suite, save the date cards / "
         "Afloral: silk flower centerpieces, table runner set",
         "when to send save the dates; wedding invitation wording; diy wedding centerpieces; "
         "seating chart template"),
        ("rings and gifts", (150, 4000),
         "Blue Nile, Brilliant Earth, Mejuri: lab grown diamond engagement ring, wedding band, "
         "bridesmaid gift set",
         "lab grown vs natural diamond; average wedding cost 2026; wedding budget spreadsheet; "
         "wedding registry ideas; wedding timeline checklist 12 months"),
    ]),
    "woodworking": ("Woodworking", [
        ("power tools", (100, 700),
         "DeWalt, Makita, Festool, Milwaukee: track saw, random orbital sander, cordless drill driver, "
         "compact router",
         "track saw vs table saw; best beginner woodworking tools; is festool worth it; router bit set beginner"),
        ("hand tools", (20, 200),
         "Stanley, Veritas, Narex: block plane, chisel set, marking gauge / Irwin, Bessey: bar clamps, pipe clamps",
         "how to sharpen chisels; hand cut dovetails; how to flatten a workbench top; hand plane setup"),
        ("wood finishing", (10, 60),
         "Minwax, Rubio Monocoat, General Finishes, Osmo: wood stain, hardwax oil, satin polyurethane, danish oil",
         "oil vs polyurethane finish; how to finish walnut; rubio monocoat application; "
         "blotchy stain on pine fix"),
    ]),
    "board_games": ("Board games", [
        ("strategy board games", (35, 150),
         "Stonemaier Games: Wingspan board game, Scythe board game / Fantasy Flight: Twilight Imperium / "
         "Cephalofair: Gloomhaven board game / Z-Man Games: Pandemic board game",
         "best strategy board games 2026; wingspan expansions worth it; gloomhaven vs frosthaven; heavy euro games"),
        ("party and family games", (15, 40),
         "Czech Games Edition: Codenames / Days of Wonder: Ticket to Ride / Libellud: Dixit / "
         "Exploding Kittens: Exploding Kittens card game / Repos Production: 7 Wonders",
         "best party games for adults; board games for 2 players; family board games ages 8; "
         "ticket to ride rules"),
        ("game accessories", (10, 120),
         "Meeple Realty, Folded Space, Broken Token: board game organizer insert / "
         "Ultra Pro, Dragon Shield: card sleeves 100 pack",
         "board game storage ideas; is sleeving cards worth it; board game table topper; best solo board games"),
    ]),
    "yoga_meditation": ("Yoga and meditation", [
        ("yoga mats and props", (15, 130),
         "Manduka, Lululemon, Gaiam, JadeYoga: yoga mat 5mm, cork yoga block, yoga strap",
         "best non slip yoga mat; manduka prolite vs pro; yoga for lower back pain; yoga mat thickness guide"),
        ("meditation", (20, 120),
         "Walden, Florensi: meditation cushion, zafu meditation pillow / Headspace, Calm: annual subscription",
         "how to start meditating; 10 minute guided meditation; box breathing technique; meditation for anxiety"),
        ("yoga apparel", (30, 120),
         "Lululemon, Alo Yoga, Vuori: yoga leggings, performance joggers, sports bra",
         "what to wear to hot yoga; vinyasa vs hatha yoga; beginner yoga flow 20 minutes; "
         "yoga teacher training online"),
    ]),
    "ev_ownership": ("Electric vehicle ownership", [
        ("ev chargers", (300, 800),
         "ChargePoint, Emporia, Grizzl-E: level 2 home charger, 48 amp ev charger / Tesla: Wall Connector",
         "level 2 charger installation cost; 40 amp vs 48 amp charger; nema 14-50 vs hardwired; "
         "tesla wall connector for non tesla"),
        ("ev accessories", (20, 250),
         "Lectron: nacs to j1772 adapter, portable ev charger / WeatherTech, 3D MAXpider: all weather floor mats",
         "nacs adapter compatibility; ev road trip planning app; winter ev range loss; "
         "ev charging etiquette"),
        ("ev tires and maintenance", (120, 350),
         "Michelin, Pirelli, Continental: ev tire 19 inch, all season ev tire",
         "do ev tires wear faster; ev tax credit 2026; ev battery degradation; model y vs ioniq 5"),
    ]),
    "knitting": ("Knitting", [
        ("yarn", (5, 40),
         "Malabrigo, Lion Brand, Drops, Knit Picks: merino wool yarn, chunky yarn, sock yarn, alpaca blend yarn",
         "best yarn for beginners; merino vs acrylic yarn; how much yarn for a sweater; yarn weight chart"),
        ("needles and notions", (6, 120),
         "ChiaoGoo, Clover, Addi, KnitPro: interchangeable circular needle set, bamboo knitting needles, "
         "stitch markers",
         "circular vs straight needles; how to cast on knitting; magic loop tutorial; knitting needle size chart"),
        ("knitting patterns and books", (6, 35),
         "PetiteKnit, Tin Can Knits, Andrea Mowry: sweater knitting pattern, beginner knitting book, "
         "sock knitting pattern",
         "easy knit sweater pattern free; how to read a knitting chart; fix a dropped stitch; "
         "top down raglan sweater"),
    ]),
}


@dataclass(frozen=True)
class Category:
    name: str
    price_range: tuple[float, float]
    items: tuple[tuple[str, str], ...]  # (brand, title)
    queries: tuple[str, ...]


@dataclass(frozen=True)
class Topic:
    key: str
    label: str
    categories: tuple[Category, ...]

    @property
    def queries(self) -> tuple[str, ...]:
        return tuple(q for c in self.categories for q in c.queries)

    @property
    def item_titles(self) -> tuple[str, ...]:
        return tuple(t for c in self.categories for _, t in c.items)

    @property
    def brands(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(b for c in self.categories for b, _ in c.items))


def _parse_items(spec: str) -> tuple[tuple[str, str], ...]:
    out = []
    for group in spec.split(" / "):
        brands, nouns = group.split(": ")
        for b in brands.split(", "):
            for n in nouns.split(", "):
                out.append((b.strip(), f"{b.strip()} {n.strip()}"))
    return tuple(out)


TOPICS: tuple[Topic, ...] = tuple(
    Topic(
        key=key,
        label=label,
        categories=tuple(
            Category(name, (float(lo), float(hi)), _parse_items(items), tuple(q.strip() for q in queries.split("; ")))
            for name, (lo, hi), items, queries in cats
        ),
    )
    for key, (label, cats) in _RAW_TOPICS.items()
)
TOPIC_KEYS: tuple[str, ...] = tuple(t.key for t in TOPICS)

# event types written by the generator (all in the contract's settings.ingest.event_types), in code order
EVENT_TYPES: tuple[str, ...] = ("search", "click", "view", "like", "cart", "purchase")
_SEARCH, _CLICK, _VIEW, _LIKE, _CART, _PURCHASE = range(6)
# verbs of memory_text parts ("searched: burr grinder for espresso"), as in the intent-memories mart
ACTION_VERBS: dict[str, str] = {
    "search": "searched", "click": "clicked", "view": "viewed", "like": "liked",
    "cart": "added to cart", "purchase": "purchased",
}
# EventsMapping(attributes=...) that carries the generator's extra columns into raw.events.attributes
EVENTS_MAPPING_ATTRIBUTES: list[str] = ["category", "brand", "price"]

# sessions: gaps inside are in [2 s, MAX_INTRA_SESSION_GAP_S]; sessions of a user are at least
# MIN_SESSION_GAP_S apart and never cross a UTC midnight (the 30-minute rule recovers them exactly)
MAX_INTRA_SESSION_GAP_S = 15 * 60
MIN_SESSION_GAP_S = 40 * 60
_MEAN_SESSION_LEN = 6.0
_MEAN_EVENTS_PER_USER = 60  # default n_users = n_events // this
_DAY_S = 86_400
# Markov chain of actions after the first (rows: previous action; columns: search, click, view, like)
_TRANSITIONS = np.array([
    [0.15, 0.50, 0.30, 0.05],  # after search: refine, or click a result / view an item
    [0.20, 0.20, 0.45, 0.15],  # after click
    [0.25, 0.20, 0.35, 0.20],  # after view
    [0.30, 0.30, 0.40, 0.00],  # after like
    [0.25, 0.25, 0.50, 0.00],  # (cart/purchase are only placed at session ends; rows kept for shape)
    [0.25, 0.25, 0.50, 0.00],
])
_P_FIRST_SEARCH = 0.85    # a session starts with a search (else with a view, e.g. from a recommendation)
_P_OTHER_CATEGORY = 0.25  # an action in another category of the session's topic
_P_CLICK_THEN_VIEW_SAME = 0.6
_P_PURCHASE = 0.10        # session (>= 4 actions) ends view -> cart -> purchase of one item
_P_CART_ONLY = 0.10       # session (>= 3 actions) ends view -> cart
_QUERY_SUFFIXES = ("", " reddit", " youtube")
_P_QUERY_SUFFIX = (0.8, 0.1, 0.1)
_PERSONA_COUNT_P = np.array([0.25, 0.35, 0.25, 0.15])  # 1, 2, 3, 4 personas


@dataclass(frozen=True)
class _Catalogue:
    """Flat arrays over all (topic, category) pairs: index `gc` is a global category number."""

    cat_topic: np.ndarray      # gc -> topic index
    cat_names: list[str]
    topic_cat_start: np.ndarray
    topic_cat_count: np.ndarray
    item_start: np.ndarray     # gc -> first global item index
    item_count: np.ndarray
    query_start: np.ndarray    # gc -> first global base-query index
    query_count: np.ndarray
    item_ids: list[str]
    item_titles: list[str]
    item_brands: list[str]
    item_gc: np.ndarray
    item_prices: np.ndarray
    query_variants: list[str]  # base query q, suffix s -> q * len(_QUERY_SUFFIXES) + s


@lru_cache(maxsize=1)
def _catalogue() -> _Catalogue:
    # prices are part of the catalogue (the same for every seed): log-uniform in the range, shop-rounded
    price_rng = np.random.default_rng(20260101)
    cat_topic, cat_names, tstart, tcount = [], [], [], []
    istart, icount, qstart, qcount = [], [], [], []
    ids, titles, brands, igc, prices, queries = [], [], [], [], [], []
    for ti, topic in enumerate(TOPICS):
        tstart.append(len(cat_names))
        tcount.append(len(topic.categories))
        for cat in topic.categories:
            gc = len(cat_names)
            cat_topic.append(ti)
            cat_names.append(cat.name)
            istart.append(len(titles))
            icount.append(len(cat.items))
            qstart.append(len(queries))
            qcount.append(len(cat.queries))
            lo, hi = cat.price_range
            p = np.exp(price_rng.uniform(math.log(lo), math.log(hi), len(cat.items)))
            p = np.where(p >= 20, np.round(p) - 0.01, np.round(p * 2) / 2 - 0.01)
            for (brand, title), price in zip(cat.items, p):
                ids.append(f"sku-{len(titles):05d}")
                titles.append(title)
                brands.append(brand)
                igc.append(gc)
                prices.append(float(price))
            queries.extend(cat.queries)
    variants = [q + s for q in queries for s in _QUERY_SUFFIXES]
    a = lambda x: np.asarray(x, dtype=np.int64)  # noqa: E731
    return _Catalogue(
        a(cat_topic), cat_names, a(tstart), a(tcount), a(istart), a(icount), a(qstart), a(qcount),
        ids, titles, brands, a(igc), np.asarray(prices), variants,
    )


# --------------------------------------------------------------------------------------------------------------
# generation
# --------------------------------------------------------------------------------------------------------------
def _within_group_rank(group: np.ndarray) -> np.ndarray:
    """Rank of each element inside its run of equal values (``group`` sorted)."""
    n = len(group)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    sizes = np.diff(np.r_[starts, n])
    return np.arange(n) - np.repeat(starts, sizes)


def _user_personas(rng: np.random.Generator, n_users: int, max_personas: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(topics [n_users, 4], weights [n_users, 4], k [n_users]): distinct topics, weights 0 beyond k."""
    n_topics = len(TOPICS)
    p_k = _PERSONA_COUNT_P[:max_personas] / _PERSONA_COUNT_P[:max_personas].sum()
    k = rng.choice(np.arange(1, max_personas + 1), size=n_users, p=p_k)
    # mildly skewed topic popularity (a seed-dependent order), sampled without replacement (Gumbel top-k)
    pop = 1.0 / (np.arange(n_topics) + 4.0)
    log_pop = np.log(pop[rng.permutation(n_topics)])
    keys = log_pop[None, :] + rng.gumbel(size=(n_users, n_topics))
    topics = np.argsort(-keys, axis=1)[:, :4]
    w = rng.gamma(1.0, size=(n_users, 4)) + 0.05
    w[np.arange(4)[None, :] >= k[:, None]] = 0.0
    w /= w.sum(axis=1, keepdims=True)
    return topics, w, k


def _session_times(
    rng: np.random.Generator, s_user: np.ndarray, lengths: np.ndarray, days: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Place sessions in time. Returns (order, session start seconds, event offsets seconds, offsets).

    ``order`` sorts the given sessions by (user, start); the other arrays are in that order: starts in
    seconds from the start day, per-event seconds since the session start, first-event index per session.
    """
    n_s = len(s_user)
    day = rng.integers(0, days, size=n_s)
    order = np.lexsort((rng.random(n_s), day, s_user))
    s_user, lengths, day = s_user[order], lengths[order], day[order]
    offsets = np.cumsum(lengths) - lengths
    n_ev = int(lengths.sum())

    # gaps inside sessions: log-normal around 40 s, in [2 s, 15 min]; 0 for a session's first event
    gaps = np.clip(np.rint(rng.lognormal(np.log(40.0), 1.0, size=n_ev)), 2, MAX_INTRA_SESSION_GAP_S).astype(np.int64)
    gaps[offsets] = 0
    cum = np.cumsum(gaps)
    rel = cum - np.repeat(cum[offsets], lengths)          # seconds since session start
    dur = rel[offsets + lengths - 1]                      # session durations

    # sessions of one (user, day): free time of the day, split by exponential gaps (a Dirichlet),
    # on top of a guaranteed MIN_SESSION_GAP_S before every session and after the last
    g = s_user * days + day
    rank = _within_group_rank(g)
    gstart = np.flatnonzero(rank == 0)
    gsize = np.diff(np.r_[gstart, n_s])
    busy = np.add.reduceat(dur, gstart) + (gsize + 1) * MIN_SESSION_GAP_S
    free = _DAY_S - 1 - busy
    if (free < 0).any():
        worst = int(gsize.max())
        raise ValueError(
            f"up to {worst} sessions of one user on one day do not fit with {MIN_SESSION_GAP_S // 60}-minute "
            "gaps: use more users (n_users) or more days"
        )
    e = rng.exponential(size=n_s)
    e_trail = rng.exponential(size=len(gstart))
    e_cum = np.cumsum(e)
    e_before_group = np.repeat(e_cum[gstart] - e[gstart], gsize)
    e_in = e_cum - e_before_group                          # exponential mass up to and including this session
    e_tot = np.repeat(np.add.reduceat(e, gstart) + e_trail, gsize)
    d_cum = np.cumsum(dur)
    d_before = d_cum - dur - np.repeat(d_cum[gstart] - dur[gstart], gsize)  # durations of earlier sessions
    start = (
        day * _DAY_S
        + (rank + 1) * MIN_SESSION_GAP_S
        + d_before
        + np.floor(np.repeat(free, gsize) * e_in / e_tot).astype(np.int64)
    )
    return order, start, rel, offsets


def _simulate(
    rng: np.random.Generator,
    s_user: np.ndarray,
    lengths: np.ndarray,
    n_users: int,
    days: int,
    start: str,
    noise: float,
    max_personas: int,
) -> pl.DataFrame:
    """Events for sessions given by their user and length (any order; output sorted by user and time)."""
    cat = _catalogue()
    topics, weights, k = _user_personas(rng, n_users, max_personas)

    # persona of each session: a user's first k sessions cover its k personas, later ones follow the weights
    by_user = np.argsort(s_user, kind="stable")
    s_user, lengths = s_user[by_user], lengths[by_user]
    rank = _within_group_rank(s_user)
    cumw = np.cumsum(weights, axis=1)
    drawn = (rng.random(len(s_user))[:, None] > cumw[s_user, :-1]).sum(axis=1)
    slot = np.where(rank < k[s_user], rank, drawn)
    s_topic = topics[s_user, slot]
    s_gc = cat.topic_cat_start[s_topic] + (rng.random(len(s_user)) * cat.topic_cat_count[s_topic]).astype(np.int64)

    order, s_start, rel, offsets = _session_times(rng, s_user, lengths, days)
    s_user, lengths, s_topic, s_gc = s_user[order], lengths[order], s_topic[order], s_gc[order]
    n_s, n_ev = len(s_user), int(lengths.sum())
    ev_session = np.repeat(np.arange(n_s), lengths)
    last = offsets + lengths - 1

    # action types: first action, then the Markov chain one position at a time over the sessions still running
    etype = np.empty(n_ev, dtype=np.int64)
    etype[offsets] = np.where(rng.random(n_s) < _P_FIRST_SEARCH, _SEARCH, _VIEW)
    cum_t = np.cumsum(_TRANSITIONS, axis=1)[:, :-1]
    by_len = np.argsort(-lengths, kind="stable")
    neg_sorted = -lengths[by_len]
    for pos in range(1, int(lengths.max())):
        # sessions with length > pos are the first n_active of by_len
        n_active = int(np.searchsorted(neg_sorted, -pos, side="left"))
        idx = offsets[by_len[:n_active]] + pos
        prev = etype[idx - 1]
        etype[idx] = (rng.random(n_active)[:, None] > cum_t[prev]).sum(axis=1)

    # category of each action: the session's, another of its topic, or (noise) any category
    u = rng.random(n_ev)
    gc = s_gc[ev_session]
    other = u < _P_OTHER_CATEGORY
    t_ev = s_topic[ev_session]
    gc = np.where(
        other,
        cat.topic_cat_start[t_ev] + (rng.random(n_ev) * cat.topic_cat_count[t_ev]).astype(np.int64),
        gc,
    )
    is_noise = rng.random(n_ev) < noise
    gc = np.where(is_noise, rng.integers(0, len(cat.cat_names), size=n_ev), gc)

    item = cat.item_start[gc] + (rng.random(n_ev) * cat.item_count[gc]).astype(np.int64)
    # a view right after a click is often the clicked item
    same = np.r_[False, (etype[1:] == _VIEW) & (etype[:-1] == _CLICK) & (ev_session[1:] == ev_session[:-1])]
    same &= rng.random(n_ev) < _P_CLICK_THEN_VIEW_SAME
    src = np.flatnonzero(same)
    item[src] = item[src - 1]
    is_noise[src] = is_noise[src - 1]

    # funnel endings: ... view X -> cart X [-> purchase X]
    outcome = rng.random(n_s)
    buy = (outcome < _P_PURCHASE) & (lengths >= 4)
    cart_only = (outcome >= _P_PURCHASE) & (outcome < _P_PURCHASE + _P_CART_ONLY) & (lengths >= 3)
    for sel, tail in ((buy, (_VIEW, _CART, _PURCHASE)), (cart_only, (_VIEW, _CART))):
        ends = last[sel]
        first = ends - (len(tail) - 1)
        for j, t in enumerate(tail):
            etype[first + j] = t
            if j:
                item[first + j] = item[first]
                is_noise[first + j] = is_noise[first]
    item_gc = cat.item_gc[item]

    # queries of searches: base query of the action's category, sometimes with a suffix
    is_search = etype == _SEARCH
    qbase = cat.query_start[gc] + (rng.random(n_ev) * cat.query_count[gc]).astype(np.int64)
    suffix = (rng.random(n_ev)[:, None] > np.cumsum(_P_QUERY_SUFFIX)[:-1]).sum(axis=1)
    qvar = qbase * len(_QUERY_SUFFIXES) + suffix

    # strings by gathering from small tables
    n_items = len(cat.item_titles)
    text_idx = np.where(is_search, n_items + qvar, item)
    item_idx = pl.Series(np.where(is_search, -1, item)).replace(-1, None)
    width = max(6, len(str(n_users - 1)))
    users = pl.Series([f"u{i:0{width}d}" for i in range(n_users)])
    t0 = _epoch_s(start)
    ts_us = (t0 + s_start[ev_session] + rel) * 1_000_000
    return pl.DataFrame({
        "user_id": users.gather(s_user[ev_session]),
        "event_ts": pl.Series(ts_us).cast(pl.Datetime("us")),
        "event_type": pl.Series(EVENT_TYPES).gather(etype),
        "item_id": pl.Series(cat.item_ids).gather(item_idx),
        "text": pl.Series(cat.item_titles + cat.query_variants).gather(text_idx),
        "category": pl.Series(cat.cat_names).gather(pl.Series(np.where(is_search, -1, item_gc)).replace(-1, None)),
        "brand": pl.Series(cat.item_brands).gather(item_idx),
        "price": pl.Series(cat.item_prices).gather(item_idx),
        "planted_persona": pl.Series(TOPIC_KEYS).gather(s_topic[ev_session]),
        "planted_session": pl.Series(ev_session, dtype=pl.Int64),
        "planted_noise": pl.Series(is_noise),
    })


def _epoch_s(start: str) -> int:
    """Seconds since 1970 of a day (or timestamp) read as UTC; the generator's day 0 starts at its midnight."""
    d = datetime.fromisoformat(start)
    d = d.replace(hour=0, minute=0, second=0, microsecond=0, tzinfo=None)
    return int((d - datetime(1970, 1, 1)).total_seconds())


def generate_events(
    n_events: int,
    n_users: int | None = None,
    seed: int = 0,
    days: int = 7,
    start: str = "2026-01-01",
    noise: float = 0.02,
    max_personas: int = 4,
) -> pl.DataFrame:
    """Exactly ``n_events`` synthetic actions of exactly ``n_users`` users (default ``n_events // 60``).

    Deterministic for a seed. Sessions average about 6 actions; every user has at least one session. Events
    are spread over ``days`` UTC days from ``start`` (a date), sorted by user and time. Raises ``ValueError``
    when the sessions of a user do not fit into the days (too few users or days for the events).
    """
    if n_events < 1:
        raise ValueError("n_events must be positive")
    if n_users is None:
        n_users = max(1, n_events // _MEAN_EVENTS_PER_USER)
    if not 1 <= n_users <= n_events:
        raise ValueError("n_users must be between 1 and n_events")
    if days < 1 or not 1 <= max_personas <= 4 or not 0.0 <= noise <= 1.0:
        raise ValueError("days >= 1, 1 <= max_personas <= 4 and 0 <= noise <= 1 are required")
    rng = np.random.default_rng(seed)
    n_sessions = min(n_events, max(n_users, round(n_events / _MEAN_SESSION_LEN)))
    # session lengths: 1 + a multinomial split of the rest with gamma weights (a negative-binomial-like spread)
    weights = rng.gamma(1.5, size=n_sessions)
    lengths = 1 + rng.multinomial(n_events - n_sessions, weights / weights.sum())
    # every user has a session; the others go to users by a log-normal activity (capped at 5x the median)
    activity = np.minimum(rng.lognormal(0.0, 0.6, size=n_users), 5.0)
    extra = rng.choice(n_users, size=n_sessions - n_users, p=activity / activity.sum())
    s_user = np.concatenate([np.arange(n_users), extra])
    return _simulate(rng, s_user, lengths.astype(np.int64), n_users, days, start, noise, max_personas)


def write_events(df: pl.DataFrame, path: str | Path) -> Path:
    """Write a generated frame to Parquet (zstd); returns the path. Ingest with the ``events`` format."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    df.write_parquet(path, compression="zstd", statistics=True)
    return path


def memory_text(parts: pl.Expr, max_chars: int = 600) -> pl.Expr:
    """Aggregation expression: ``parts`` (one per action, in order) with consecutive duplicates collapsed,
    joined by ``'; '`` and capped at ``max_chars`` characters (the last one then ``…``), as in the mart."""
    kept = parts.filter(parts.ne_missing(parts.shift(1)))
    text = kept.str.join("; ")
    return (
        pl.when(text.str.len_chars() > max_chars)
        .then(text.str.slice(0, max_chars - 1) + "…")
        .otherwise(text)
    )


def embedding_text(event_type: pl.Expr, text: pl.Expr, max_chars: int = 600) -> pl.Expr:
    """Aggregation expression: the content parts of a session as in the mart's ``embedding_text``: every action's
    text except clicks', each distinct part once in order of first occurrence, joined by ``'; '``, capped like
    ``memory_text``; a session with no such part falls back to its ``memory_text``."""
    parts = pl.when(event_type != "click").then(text.str.strip_chars()).otherwise(None)
    parts = pl.when(parts.str.len_chars() > 0).then(parts).otherwise(None).drop_nulls().unique(maintain_order=True)
    joined = parts.str.join("; ")
    joined = (pl.when(joined.str.len_chars() > max_chars)
              .then(joined.str.slice(0, max_chars - 1) + "…").otherwise(joined))
    return pl.when(joined.str.len_chars() > 0).then(joined).otherwise(
        memory_text(action_part(event_type, text), max_chars))


def action_part(event_type: pl.Expr, text: pl.Expr) -> pl.Expr:
    """``"<verb>: <text>"`` for one action (``"searched: best grinder for espresso"``)."""
    verb = event_type.replace_strict(ACTION_VERBS, default=event_type)
    return verb + ": " + text.fill_null("")


def generate_memories(
    n_users: int,
    memories_per_user: int | tuple[int, int],
    seed: int = 0,
    days: int = 14,
    noise: float = 0.02,
    max_chars: int = 600,
    max_personas: int = 4,
) -> pl.DataFrame:
    """Intent memories straight from planted sessions, for clustering work that skips ingest and dbt.

    ``memories_per_user``: a number, or an inclusive range (lo, hi) drawn per user. Returns one row per memory:
    ``user_id, memory_id, memory_text, embedding_text, planted_persona, planted_session, n_actions, started_at``,
    sorted by user and time (planted_session increases with started_at inside a user); memory_text and
    embedding_text are written like the mart's (``"searched: ...; viewed: ...; added to cart: ..."`` and the
    content parts without verbs or clicks). Deterministic for a seed.
    """
    rng = np.random.default_rng(seed)
    if isinstance(memories_per_user, int):
        per_user = np.full(n_users, memories_per_user, dtype=np.int64)
    else:
        lo, hi = memories_per_user
        per_user = rng.integers(lo, hi + 1, size=n_users)
    if n_users < 1 or per_user.min() < 1:
        raise ValueError("n_users and memories_per_user must be positive")
    s_user = np.repeat(np.arange(n_users), per_user)
    # session lengths: 1 + gamma-Poisson (mean about 6)
    lengths = 1 + rng.poisson(rng.gamma(1.5, (_MEAN_SESSION_LEN - 1) / 1.5, size=len(s_user)))
    ev = _simulate(rng, s_user, lengths.astype(np.int64), n_users, days, "2026-01-01", noise, max_personas)
    return (
        ev.lazy()
        .group_by("planted_session", maintain_order=True)
        .agg(
            pl.col("user_id").first(),
            memory_text(action_part(pl.col("event_type"), pl.col("text")), max_chars).alias("memory_text"),
            embedding_text(pl.col("event_type"), pl.col("text"), max_chars).alias("embedding_text"),
            pl.col("planted_persona").first(),
            pl.len().cast(pl.Int32).alias("n_actions"),
            pl.col("event_ts").min().alias("started_at"),
        )
        .with_columns(memory_id=pl.format("m{}", pl.col("planted_session")))
        .select(
            "user_id", "memory_id", "memory_text", "embedding_text", "planted_persona", "planted_session",
            "n_actions", "started_at"
        )
        .collect()
    )
