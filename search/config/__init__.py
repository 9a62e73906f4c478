"""The schemas of study files (:mod:`.study`) and experiment files (:mod:`.experiment`)."""
