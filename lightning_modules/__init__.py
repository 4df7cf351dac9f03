from vitfl import refuse_bare_name

refuse_bare_name(__name__)  # 'import lightning_modules' stops here with the right name
