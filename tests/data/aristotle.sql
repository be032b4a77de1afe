-- Aristotle's tables exactly as the design notes give them (a Prisma app: quoted camelCase columns).
-- No triggers, no foreign keys, no unique constraints beyond the primary keys.
CREATE TABLE "Conquest" (
    id VARCHAR PRIMARY KEY,
    "aristotleId" VARCHAR,
    "conquestType" VARCHAR,
    title VARCHAR,
    description TEXT,
    result VARCHAR DEFAULT 'PENDING',  -- PENDING, VICTORY, DEFEAT, NEUTRAL
    "resultNotes" TEXT,
    "useAsExample" BOOLEAN DEFAULT FALSE,
    "evaluatedBy" VARCHAR,
    "evaluatedAt" TIMESTAMP,
    status VARCHAR DEFAULT 'DRAFT',
    philosopher VARCHAR NOT NULL,
    domain VARCHAR NOT NULL,
    "createdAt" TIMESTAMP DEFAULT NOW(),
    "updatedAt" TIMESTAMP DEFAULT NOW()
);

CREATE TABLE ml_analysis_rating (
    id VARCHAR PRIMARY KEY,
    conquest_analysis_id VARCHAR NOT NULL,  -- FK to Conquest.id
    analysis_type VARCHAR NOT NULL,  -- 'conquest_analysis'
    rating INTEGER,  -- 1-5 stars
    feedback TEXT,
    is_gold_star BOOLEAN DEFAULT FALSE,
    use_as_sample_response BOOLEAN DEFAULT FALSE,
    philosopher VARCHAR NOT NULL,
    domain VARCHAR NOT NULL,
    label_studio_task_id INTEGER,
    label_studio_annotation_id INTEGER,
    created_at TIMESTAMP DEFAULT NOW(),
    updated_at TIMESTAMP DEFAULT NOW()
);
