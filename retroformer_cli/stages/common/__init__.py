"""What the stages share, one rule each: results (:mod:`.results`), checkpoint lookup and the newest trainer
checkpoint (:mod:`.checkpoints`), names (:mod:`.names`), reflection cleaning (:mod:`.reflections`), the
deterministic task split (:mod:`.splits`), the progress protocol the commands render (:mod:`.progress`),
rating rows (:mod:`.ratings`) and what the training stages share (:mod:`.training`).

This package file imports nothing, so a stage (or the workspace) can import one leaf without the rest.
"""
