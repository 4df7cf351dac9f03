from vitfl import refuse_bare_name

refuse_bare_name(__name__)  # 'import core' stops here with the right name
