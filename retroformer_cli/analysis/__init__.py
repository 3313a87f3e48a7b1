"""Reading finished runs: success tables and paired statistics (:mod:`.stats`), one task's trials
(:mod:`.show`), the HTML report (:mod:`.report`) and the learning experiment's report (:mod:`.learning_report`).
Nothing here plays an episode or trains a model; this package file imports nothing."""
